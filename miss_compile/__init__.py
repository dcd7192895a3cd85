"""miss_compile: MiSS adapters (PEFT-compatible) made fast and deployable."""

from .backend import make_backend, miss_backend
from .checkpoint import load_adapter, read_adapter, save_adapter
from .config import MissConfig
from .distributed import (
    gather_adapter,
    load_adapter_sharded,
    save_adapter_distributed,
    shard_fsdp2,
    trainable_blocks,
    wrap_ddp,
)
from .explain import explain
from .inject import (
    adapters_disabled,
    apply_miss,
    enable_adapters,
    merge_adapters,
    set_active_adapters,
    unmerge_adapters,
)
from .layer import MissLinear
from .lora import to_lora
from .passes import PassReport
from .stacked import NO_ADAPTER, adapter_ids_for, stack_adapters

__all__ = [
    "MissConfig",
    "MissLinear",
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
    "PassReport",
    "wrap_ddp",
    "shard_fsdp2",
    "trainable_blocks",
    "gather_adapter",
    "save_adapter_distributed",
    "load_adapter_sharded",
    "stack_adapters",
    "adapter_ids_for",
    "NO_ADAPTER",
    "to_lora",
]
