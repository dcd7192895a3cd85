"""miss_compile: MiSS adapters (PEFT-compatible) made fast and deployable.

The verbs a user calls are here; the rest lives in its module: distributed training in
`miss_compile.distributed`, the layer in `miss_compile.layer`, the pass's report in
`miss_compile.passes`, the exporter in `miss_compile.export` (ARCHITECTURE.md maps the modules)."""

from .backend import make_backend, miss_backend
from .checkpoint import load_adapter, read_adapter, save_adapter
from .config import MissConfig
from .explain import explain
from .inject import (
    adapters_disabled,
    apply_miss,
    enable_adapters,
    merge_adapters,
    set_active_adapters,
    unmerge_adapters,
)
from .lora import to_lora
from .stacked import NO_ADAPTER, adapter_ids_for, stack_adapters

__all__ = [
    "MissConfig",
    "apply_miss",
    "load_adapter",
    "read_adapter",
    "save_adapter",
    "set_active_adapters",
    "enable_adapters",
    "adapters_disabled",
    "merge_adapters",
    "unmerge_adapters",
    "miss_backend",
    "make_backend",
    "explain",
    "stack_adapters",
    "adapter_ids_for",
    "NO_ADAPTER",
    "to_lora",
]
