"""Where a saved adapter can go: PEFT's MiSS loader adapts nn.Linear only, and an adapter belongs to
the base model class it was trained on. The class is recorded as PEFT records it, in adapter_config.json's
`auto_mapping` ({"base_model_class", "parent_library"}: PEFT's own field, which its loaders read or skip)."""

from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn

from .peft_compat import model_root

__all__ = ["base_model_fields", "warn_if_peft_cannot_load", "warn_if_other_base_class", "recorded_base_class"]

logger = logging.getLogger(__name__)


def base_model_fields(model: nn.Module) -> dict[str, Any]:
    """The adapter_config.json fields naming the class of `model`'s base model (as PEFT's save_pretrained writes them)."""
    base = type(model_root(model))
    return {"auto_mapping": {"base_model_class": base.__name__, "parent_library": base.__module__}}


def warn_if_peft_cannot_load(layers: dict[str, nn.Module], directory: str | os.PathLike) -> None:
    """One WARNING when some adapted layers are not nn.Linear (GPT-2's Conv1D): PEFT's MiSS refuses them."""
    other = {name: type(layer.base_layer).__name__ for name, layer in layers.items()
             if not isinstance(layer.base_layer, nn.Linear)}
    if not other:
        return
    names = sorted(other)
    more = f", and {len(names) - 4} more" if len(names) > 4 else ""
    logger.warning(
        "save_adapter: PEFT's PeftModel.from_pretrained cannot load %s: %d of its %d layers are %s, and PEFT's MiSS "
        "adapts nn.Linear only (%s%s). miss_compile.load_adapter loads it; for PEFT, convert it with "
        "miss_compile.to_lora (balance and mini; PEFT's LoRA takes Conv1D).",
        directory, len(names), len(layers), " / ".join(sorted(set(other.values()))), ", ".join(names[:4]), more)


def recorded_base_class(fields: dict[str, Any]) -> str | None:
    """The base model class an adapter_config.json records (auto_mapping), or None."""
    recorded = fields.get("auto_mapping")
    return recorded.get("base_model_class") if isinstance(recorded, dict) else None


def warn_if_other_base_class(model: nn.Module, fields: dict[str, Any], directory: str | os.PathLike) -> None:
    """One WARNING when the checkpoint records another base model class than `model`'s (shapes may
    still match, as a Qwen2 adapter's do on a Llama of the same sizes). Quiet when none is recorded."""
    saved_from = recorded_base_class(fields)
    loading_into = type(model_root(model)).__name__
    if saved_from and saved_from != loading_into:
        logger.warning(
            "load_adapter: the adapter in %s was trained on a %s (adapter_config.json auto_mapping) and is being "
            "loaded into a %s. Its shapes fit, so it loads, but its blocks were trained against another model's "
            "weights: check that this is the base model you meant.", directory, saved_from, loading_into)
