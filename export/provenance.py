"""What an exported graph records of where it came from (metadata_props, keys `miss_compile.*`), and
the rules read back from it: an adapter file for a graph whose adapter trained whole modules is
refused (the file would run with the exported adapter's heads), and generate stops at the recorded
eos ids as transformers' generate does.

    miss_compile.base_model        the transformers class (LlamaForCausalLM)
    miss_compile.adapters          {adapter: variant}, miss_compile.active_adapters [names]
    miss_compile.merged / stacked  true / false
    miss_compile.modules_to_save   {module: adapter} whose trained copies are the graph's weights
    miss_compile.generation        {eos_token_id, pad_token_id, bos_token_id} (KV-cache graphs)
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Mapping
from typing import Any

import onnx
from torch import nn

from miss_compile.peft_compat import adapter_variant, model_root, named_miss_layers
from miss_compile.saved_modules import running_saved_copies

__all__ = ["METADATA_PREFIX", "provenance", "generation_ids", "graph_metadata", "saved_modules_in",
           "saved_modules_refusal", "recorded_generation_ids"]

METADATA_PREFIX = "miss_compile."
BASE_MODEL, MERGED, SAVED_MODULES, GENERATION = (
    f"{METADATA_PREFIX}{key}" for key in ("base_model", "merged", "modules_to_save", "generation"))


def provenance(model: nn.Module, prepared: nn.Module, merged: bool, stacked: bool,
               base_class: type | None = None) -> dict[str, str]:
    """metadata_props saying where the graph came from. `prepared`: export.prepare(model); `base_class`:
    the user's class when `model` runs under an export-only subclass (the KV-cache export's), which
    also records the generation ids."""
    layers = named_miss_layers(prepared)
    variants: dict[str, set[str]] = {}
    for layer in layers.values():
        for name in layer.miss_block:
            variants.setdefault(name, set()).add(adapter_variant(layer, name))
    active = sorted({name for layer in layers.values() if not layer.disable_adapters for name in layer.active_adapters})
    root = model_root(model)
    properties = {
        f"{METADATA_PREFIX}version": importlib.metadata.version("miss_compile"),
        BASE_MODEL: (base_class or type(root)).__name__,
        f"{METADATA_PREFIX}adapters": json.dumps({name: ",".join(sorted(kinds)) for name, kinds in sorted(variants.items())}),
        f"{METADATA_PREFIX}active_adapters": json.dumps(active),
        MERGED: json.dumps(merged),
        f"{METADATA_PREFIX}stacked": json.dumps(stacked),
        SAVED_MODULES: json.dumps(running_saved_copies(model_root(prepared)), sort_keys=True),
    }
    if base_class is not None:
        properties[GENERATION] = json.dumps(generation_ids(root))
    return properties


def generation_ids(lm: nn.Module) -> dict[str, Any]:
    """eos / pad / bos ids as transformers' generate reads them: generation_config over config.json;
    eos as an int or a list, None where the model names none."""
    generation = getattr(lm, "generation_config", None)

    def pick(name: str) -> Any:
        value = getattr(generation, name, None) if generation is not None else None
        value = value if value is not None else getattr(lm.config, name, None)
        if isinstance(value, (list, tuple)):
            return [int(v) for v in value] or None
        return None if value is None else int(value)

    return {name: pick(name) for name in ("eos_token_id", "pad_token_id", "bos_token_id")}


def graph_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata_props of the ONNX model at `path` (its weights are not read)."""
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def saved_modules_in(metadata: Mapping[str, str]) -> dict[str, str]:
    """Module -> adapter whose trained copy (modules_to_save) the graph holds; {} when none or not recorded."""
    return json.loads(metadata.get(SAVED_MODULES, "{}"))


def saved_modules_refusal(metadata: Mapping[str, str], graph: str) -> str | None:
    """Why no adapter file may be applied to unmerged `graph` (named in the message), or None when
    files may (merged graphs have no blocks to swap: refused as such elsewhere)."""
    saved = saved_modules_in(metadata)
    if not saved or json.loads(metadata.get(MERGED, "false")):
        return None
    adapters = sorted(set(saved.values()))
    return (f"{graph} was exported with adapter {adapters[0]!r}, which trains whole modules too (modules_to_save: "
            f"{sorted(saved)}): the graph holds that adapter's trained copies as plain weights, and an .onnx_adapter "
            "carries MiSS blocks only, so another adapter's file would run with these modules. Export one graph per "
            "adapter (export_onnx / miss-export without --unmerged), or train the adapters without modules_to_save")


def recorded_generation_ids(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The generation_ids a KV-cache graph records; None for other graphs and older exports."""
    return json.loads(metadata[GENERATION]) if GENERATION in metadata else None
