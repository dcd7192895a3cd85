"""Live PEFT models wherever our API takes a model: finding their MiSS layers and reading them.

PEFT is optional: nothing here imports it unless the caller already has (a PEFT model exists only
when `peft` is imported).
"""

from __future__ import annotations

import copy
import sys
from typing import Any

from torch import nn

from .layer import MissLinear, carry_untied_weight
from .saved_modules import SavedModule, from_peft_wrapper, saved_module_wrappers

__all__ = ["peft_tuner", "is_miss_layer", "adapter_variant", "named_miss_layers", "model_root", "from_peft"]


def _peft() -> Any:
    return sys.modules.get("peft")


def peft_tuner(model: nn.Module) -> nn.Module | None:
    """PEFT's MissModel inside a PeftModel (or the MissModel itself); None for other models."""
    peft = _peft()
    if peft is None:
        return None
    tuner = model.base_model if isinstance(model, peft.PeftModel) else model
    if isinstance(tuner, peft.tuners.miss.MissModel):
        return tuner
    if isinstance(model, peft.PeftModel):
        raise TypeError(
            f"this PeftModel carries {type(tuner).__name__} adapters, not MiSS; miss_compile handles MiSS only"
        )
    return None


def model_root(model: nn.Module) -> nn.Module:
    """The module whose named_modules() give checkpoint names (PEFT: the wrapped transformers model)."""
    tuner = peft_tuner(model)
    return model if tuner is None else tuner.model


def is_miss_layer(module: nn.Module) -> bool:
    if isinstance(module, MissLinear):
        return True
    peft = _peft()
    return peft is not None and isinstance(module, peft.tuners.miss.MissLayer)


def adapter_variant(layer: nn.Module, name: str) -> str:
    if isinstance(layer, MissLinear):
        return layer.miss_variant[name]
    # PEFT keeps one variant per layer, set by the layer's first adapter.
    miss_fn = layer.miss_fn
    return miss_fn if miss_fn in ("bat", "mini") else "balance"


def named_miss_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every MiSS-carrying layer, by its name under model_root(model)."""
    return {name: module for name, module in model_root(model).named_modules() if is_miss_layer(module)}


def from_peft(model: nn.Module) -> nn.Module:
    """A copy of a PEFT MiSS model as the plain model with our MissLinear layers (same blocks,
    variants, dropout, active adapters and merge state) and our SavedModule for PEFT's
    ModulesToSaveWrapper (the trained heads); other models are copied as they are."""
    tuner = peft_tuner(model)
    if tuner is None:
        return copy.deepcopy(model)
    converted = copy.deepcopy(tuner.model)
    for name, peft_layer in list(named_miss_layers(converted).items()):
        if isinstance(peft_layer, MissLinear):
            continue
        layer = MissLinear(peft_layer.get_base_layer())
        for adapter, block in peft_layer.miss_block.items():
            layer.miss_block[adapter] = nn.Parameter(block.detach().clone(), requires_grad=block.requires_grad)
            layer.miss_dropout[adapter] = peft_layer.miss_dropout[adapter]
            layer.miss_variant[adapter] = adapter_variant(peft_layer, adapter)
            layer.miss_r[adapter] = peft_layer.miss_r[adapter]
            layer.miss_mini_r[adapter] = peft_layer.miss_mini_r[adapter]
        layer.active_adapters = [a for a in peft_layer.active_adapters if a in layer.miss_block]
        layer.merged_adapters = list(peft_layer.merged_adapters)
        layer.disable_adapters = bool(peft_layer.disable_adapters)
        carry_untied_weight(peft_layer, layer)
        layer.train(peft_layer.training)
        parent_name, _, child_name = name.rpartition(".")
        setattr(converted.get_submodule(parent_name), child_name, layer)
    for name, wrapper in saved_module_wrappers(converted).items():
        if not isinstance(wrapper, SavedModule):
            parent_name, _, child_name = name.rpartition(".")
            setattr(converted.get_submodule(parent_name), child_name, from_peft_wrapper(wrapper))
    return converted
