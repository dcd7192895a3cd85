"""What an exported graph records of where it came from (metadata_props, keys `miss_compile.*`), and
the rules read back from it: an adapter file for a graph whose adapter trained whole modules is
refused (the file would run with the exported adapter's heads), and generate takes the recorded eos
and pad ids and greedy settings (export.greedy) as transformers' generate takes the model's.

    miss_compile.base_model        the transformers class (LlamaForCausalLM)
    miss_compile.adapters          {adapter: variant}, miss_compile.active_adapters [names]
    miss_compile.merged / stacked  true / false
    miss_compile.modules_to_save   {module: adapter} whose trained copies are the graph's weights
    miss_compile.generation        {eos_token_id, pad_token_id, bos_token_id, settings} (KV-cache graphs;
                                   settings: generation_config fields that change greedy tokens)
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Mapping
from typing import Any

from torch import nn

from miss_compile.peft_compat import adapter_variant, model_root, named_miss_layers
from miss_compile.saved_modules import running_saved_copies

from .causal_lm import flat_cache_base
from .greedy import greedy_settings

__all__ = ["METADATA_PREFIX", "provenance", "generation_ids", "token_ids_of", "generation_record", "saved_modules_in",
           "saved_modules_refusal", "recorded_generation", "predates_saved_modules", "exported_class",
           "PREDATES_WARNING"]

METADATA_PREFIX = "miss_compile."
BASE_MODEL, MERGED, SAVED_MODULES, GENERATION = (
    f"{METADATA_PREFIX}{key}" for key in ("base_model", "merged", "modules_to_save", "generation"))


def provenance(model: nn.Module, prepared: nn.Module, merged: bool, stacked: bool) -> dict[str, str]:
    """metadata_props saying where the graph came from. `prepared`: export.prepare(model). A KV-cache
    export (its model runs under the flat-cache subclass) also records what generate needs."""
    layers = named_miss_layers(prepared)
    variants: dict[str, set[str]] = {}
    for layer in layers.values():
        for name in layer.miss_block:
            variants.setdefault(name, set()).add(adapter_variant(layer, name))
    active = sorted({name for layer in layers.values() if not layer.disable_adapters for name in layer.active_adapters})
    root = model_root(model)
    base_class = flat_cache_base(root)  # the user's class under the KV-cache export's subclass
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
        properties[GENERATION] = json.dumps(generation_record(root))
    return properties


def generation_ids(lm: nn.Module) -> dict[str, Any]:
    """eos / pad / bos ids as transformers' generate reads them: from the model's generation_config
    (config.json only for a model without one; transformers 5 reads no other); eos an int or a list,
    None where it names none."""
    generation = getattr(lm, "generation_config", None)
    return token_ids_of(generation if generation is not None else lm.config)


def token_ids_of(source: Any) -> dict[str, Any]:
    """eos / pad / bos ids as a config (or generation config) names them, as ints (eos may be a list)."""

    def pick(name: str) -> Any:
        value = getattr(source, name, None)
        if isinstance(value, (list, tuple)):
            return [int(v) for v in value] or None
        return None if value is None else int(value)

    return {name: pick(name) for name in ("eos_token_id", "pad_token_id", "bos_token_id")}


def generation_record(lm: nn.Module) -> dict[str, Any]:
    """What a KV-cache graph records for generate: the ids and the settings that change greedy tokens."""
    return {**generation_ids(lm), "settings": greedy_settings(getattr(lm, "generation_config", None))}


def saved_modules_in(metadata: Mapping[str, str]) -> dict[str, str]:
    """Module -> adapter whose trained copy (modules_to_save) the graph holds; {} when none or not recorded."""
    return json.loads(metadata.get(SAVED_MODULES, "{}"))


PREDATES_WARNING = ("was exported before graphs recorded the modules their adapter trains whole (modules_to_save): "
                    "if it holds a trained head, an adapter file runs with that head. Export it again to have "
                    "this checked")


def predates_saved_modules(metadata: Mapping[str, str]) -> bool:
    """A graph of ours exported before graphs recorded their trained modules: adapter files cannot be checked."""
    unmerged = not json.loads(metadata.get(MERGED, "true"))
    return f"{METADATA_PREFIX}version" in metadata and SAVED_MODULES not in metadata and unmerged


def exported_class(metadata: Mapping[str, str]) -> str | None:
    """The recorded base model class (older KV-cache graphs recorded the export's `<class>WithPast`)."""
    recorded = metadata.get(BASE_MODEL)
    return recorded.removesuffix("WithPast") if recorded else None


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


def recorded_generation(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The generation_record a KV-cache graph holds; None for other graphs and older exports."""
    return json.loads(metadata[GENERATION]) if GENERATION in metadata else None
