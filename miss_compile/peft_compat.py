"""Live PEFT models wherever our API takes a model: finding their MiSS layers and reading them.

PEFT is optional: nothing here imports it unless the caller already has (a PEFT model exists only
when `peft` is imported).
"""

from __future__ import annotations

import copy
import sys
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from .layer import MissLinear, carry_untied_weight, has_untied_weight
from .saved_modules import SavedModule, from_peft_wrapper, saved_module_wrappers

__all__ = ["peft_tuner", "is_miss_layer", "adapter_variant", "named_miss_layers", "layers_with", "model_root", "from_peft",
           "shared_base_weights", "shared_weights", "base_weight_of"]


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


def layers_with(model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    """The MiSS layers that carry `adapter_name`, by name under model_root(model)."""
    return {name: layer for name, layer in named_miss_layers(model).items() if adapter_name in layer.miss_block}


# --- base weights that other modules read too (tied output heads): merges must not write them


def _memory(tensor: torch.Tensor) -> tuple[tuple, int, int] | None:
    """(storage, first byte, end byte) of a tensor's memory; None where that cannot be told (meta,
    sparse, quantized, DTensor...). Views of one flat buffer that do not overlap are not sharing."""
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    if not pointer or tensor.numel() == 0:
        return None
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    start = tensor.storage_offset() * tensor.element_size()
    return (tensor.device, pointer), start, start + span * tensor.element_size()


def shared_base_weights(model: nn.Module) -> dict[str, list[str]]:
    """MiSS layer name -> every parameter or buffer name that reads its base weight, for the layers
    whose base weight some other module reads too (see shared_weights). Merging into such a
    weight in place would change those modules as well."""
    layers = named_miss_layers(model)
    return shared_weights(model_root(model), {name: base_weight_of(layer) for name, layer in layers.items()})


def shared_weights(root: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Key -> every parameter or buffer name of `root` that reads `weights[key]`, for the weights some
    other module reads too: the same Parameter under two names (a tied lm_head and input embedding)
    or another tensor over the same memory."""
    holders: dict[int, list[str]] = defaultdict(list)
    tensors: dict[int, torch.Tensor] = {}
    for name, tensor in [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]:
        holders[id(tensor)].append(name)
        tensors[id(tensor)] = tensor
    by_storage: dict[tuple, list[tuple[int, int, list[str]]]] = defaultdict(list)
    for key, tensor in tensors.items():
        memory = _memory(tensor)
        if memory is not None:
            by_storage[memory[0]].append((memory[1], memory[2], holders[key]))
    shared: dict[str, list[str]] = {}
    for key, weight in weights.items():
        readers = set(holders[id(weight)])
        memory = _memory(weight)
        if memory is not None:
            storage, start, end = memory
            for other_start, other_end, names in by_storage[storage]:
                if other_start < end and start < other_end:
                    readers.update(names)
        if len(readers) > 1:
            shared[key] = sorted(readers)
    return shared


def base_weight_of(layer: nn.Module) -> torch.Tensor:
    """The base layer's weight Parameter, ours or PEFT's (GPT-2 Conv1D: as stored, [in, out])."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer.base_layer
    return base.weight


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
    # A direct MissLinear.merge() on the copy must not write into a weight another module reads.
    shared = shared_base_weights(converted)
    for name, layer in named_miss_layers(converted).items():
        if isinstance(layer, MissLinear):
            layer.base_weight_shared = name in shared or has_untied_weight(layer)
    for name, wrapper in saved_module_wrappers(converted).items():
        if not isinstance(wrapper, SavedModule):
            parent_name, _, child_name = name.rpartition(".")
            setattr(converted.get_submodule(parent_name), child_name, from_peft_wrapper(wrapper))
    return converted
