"""apply_miss and the model-level verbs: choose, disable, merge and unmerge adapters.

Every verb takes our models and live PEFT MiSS models alike.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from . import reference
from .adapter_settings import check_same_settings
from .config import ALL_LINEAR, MissConfig
from .layer import MissLinear, base_features, has_untied_weight, retie_base_weight, untie_base_weight
from .modules_to_save import find_modules_to_save, wrap_modules_to_save
from .peft_compat import (
    adapter_variant,
    base_weight_of,
    is_miss_layer,
    model_root,
    named_miss_layers,
    peft_tuner,
    shared_base_weights,
)
from .saved_modules import (
    enable_saved_modules,
    is_saved_module,
    is_saved_module_parameter,
    set_saved_adapters,
)
from .stacked import enable_adapter_selection

__all__ = [
    "apply_miss",
    "set_active_adapters",
    "enable_adapters",
    "adapters_disabled",
    "merge_adapters",
    "unmerge_adapters",
]

logger = logging.getLogger(__name__)


def apply_miss(model: nn.Module, config: MissConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter `adapter_name` to every layer `config` targets; returns `model` (changed in place).

    Everything except MiSS blocks is frozen. All checks run before the model is touched, and a
    failure part-way restores it, so a failed apply leaves the model exactly as it was.
    """
    config.validate()
    tuner = peft_tuner(model)
    targets = find_targets(model_root(model), config)
    for name, module in targets.items():
        _check_target(name, module, config, adapter_name)
    check_same_settings(model, config, adapter_name)
    find_modules_to_save(model_root(model), config)
    if tuner is not None:
        model = _apply_to_peft(model, tuner, config, adapter_name, list(targets))
    else:
        model = _apply_to_ours(model, config, adapter_name, targets)
    return enable_adapter_selection(model)


def find_targets(root: nn.Module, config: MissConfig) -> dict[str, nn.Module]:
    """name -> layer (plain or already MiSS-carrying) that `config` selects under `root`."""
    output_head = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
    targets: dict[str, nn.Module] = {}
    inside_miss_layer: list[str] = []
    for name, module in root.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in inside_miss_layer):
            continue
        adaptable = is_miss_layer(module) or base_features(module) is not None
        if is_miss_layer(module) or is_saved_module(module):
            inside_miss_layer.append(name)
        if config.is_excluded(name):
            continue
        if config.target_modules == ALL_LINEAR:
            base = getattr(module, "base_layer", module)
            if adaptable and base is not output_head:
                targets[name] = module
        elif config.selects(name):
            if not adaptable:
                raise ValueError(
                    f"target_modules selects {name!r}, a {type(module).__name__}; MiSS adapts nn.Linear and "
                    "Conv1D only: narrow target_modules or add the module to exclude_modules"
                )
            targets[name] = module
    if not targets:
        raise ValueError(
            f"no layer matched target_modules={config.target_modules!r} (exclude_modules="
            f"{config.exclude_modules!r}) in {type(root).__name__}; check the module names with model.named_modules()"
        )
    return targets


def _features(module: nn.Module) -> tuple[int, int]:
    if is_miss_layer(module):
        return module.in_features, module.out_features
    return base_features(module)


def _check_target(name: str, module: nn.Module, config: MissConfig, adapter_name: str) -> None:
    in_features, out_features = _features(module)
    config.check_layer(name, in_features, out_features)
    if not is_miss_layer(module):
        return
    if adapter_name in module.miss_block:
        raise ValueError(f"layer {name!r} already has an adapter named {adapter_name!r}; pick another adapter_name")
    if module.merged:
        raise ValueError(f"layer {name!r} has merged adapters {module.merged_adapters}; unmerge before adding one")
    if not isinstance(module, MissLinear) and module.miss_block:
        existing = adapter_variant(module, next(iter(module.miss_block)))
        if existing != config.variant:
            raise ValueError(
                f"layer {name!r} is a PEFT MissLinear whose adapters are {existing!r}; PEFT computes every adapter "
                f"of a layer with its first adapter's variant, so a {config.variant!r} adapter would be wrong. "
                "Use the same variant, or load the adapters into a model adapted with miss_compile.apply_miss"
            )


def _apply_to_ours(
    model: nn.Module, config: MissConfig, adapter_name: str, targets: dict[str, nn.Module]
) -> nn.Module:
    trainable = {param: param.requires_grad for param in model.parameters()}
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    extended: list[MissLinear] = []
    try:
        for name, module in targets.items():
            if isinstance(module, MissLinear):
                layer = module
                extended.append(layer)
            else:
                layer = MissLinear(module)
                parent_name, _, child_name = name.rpartition(".")
                parent = model.get_submodule(parent_name)
                setattr(parent, child_name, layer)
                replaced.append((parent, child_name, module))
            layer.add_adapter(adapter_name, config)
        for name, param in model.named_parameters():
            if ".miss_block." not in f".{name}" and not is_saved_module_parameter(name):
                param.requires_grad_(False)
        shared = shared_base_weights(model)
        for name, layer in named_miss_layers(model).items():
            if isinstance(layer, MissLinear):
                layer.base_weight_shared = name in shared
        wrap_modules_to_save(model, config, adapter_name)  # undoes itself if it fails
    except BaseException:
        for parent, child_name, original in replaced:
            setattr(parent, child_name, original)
        for layer in extended:
            if adapter_name in layer.miss_block:
                layer.remove_adapter(adapter_name)
        for param, flag in trainable.items():
            param.requires_grad_(flag)
        raise
    logger.info("added MiSS adapter %r (%s, r=%d) to %d layers", adapter_name, config.variant, config.r, len(targets))
    return model


def _apply_to_peft(
    model: nn.Module, tuner: nn.Module, config: MissConfig, adapter_name: str, names: list[str]
) -> nn.Module:
    if adapter_name in tuner.peft_config:
        raise ValueError(f"the PEFT model already has an adapter named {adapter_name!r}; pick another adapter_name")
    peft_config = config.to_peft()
    peft_config.target_modules = set(names)  # what we checked is exactly what PEFT adapts
    try:
        if hasattr(model, "add_adapter"):
            model.add_adapter(adapter_name, peft_config)
        else:
            tuner.peft_config[adapter_name] = peft_config
            tuner.inject_adapter(tuner.model, adapter_name)
    except BaseException:
        if adapter_name in tuner.peft_config:
            tuner.delete_adapter(adapter_name)
        raise
    return model


def _to_merge(layer: nn.Module, adapter_names: list[str] | None) -> list[str]:
    names = layer.active_adapters if adapter_names is None else adapter_names
    return [name for name in names if name in layer.miss_block and name not in layer.merged_adapters]


# --- choosing, disabling, merging


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    layers = named_miss_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MiSS layers; add adapters with apply_miss or load_adapter")
    return layers


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name on the model, in the order first seen."""
    names: dict[str, None] = {}
    for layer in _layers(model).values():
        names.update(dict.fromkeys(layer.miss_block))
    return list(names)


def set_active_adapters(model: nn.Module, names: str | list[str]) -> None:
    """Activate `names` (several at once is allowed, applied in this order); only they train."""
    names = [names] if isinstance(names, str) else list(names)
    unknown = [name for name in names if name not in adapter_names(model)]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {adapter_names(model)}")
    tuner = peft_tuner(model)
    if tuner is not None:
        tuner.set_adapter(names)
        return
    set_saved_adapters(model, names)
    for layer in _layers(model).values():
        layer.set_adapter(names)


def enable_adapters(model: nn.Module, enabled: bool = True) -> None:
    """Turn every adapter off (the base model's outputs) or back on; merged ones are unmerged first."""
    layers = _layers(model)
    if not enabled:
        unmerge_adapters(model)
    for layer in layers.values():
        layer.enable_adapters(enabled)
    enable_saved_modules(model_root(model), enabled)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    enable_adapters(model, False)
    try:
        yield model
    finally:
        enable_adapters(model, True)


def merge_adapters(model: nn.Module, adapter_names: list[str] | None = None) -> None:
    """Fold adapters (default: the active ones) into the base weights, all layers or none.

    A base weight that other modules read too (a tied lm_head and input embedding) is never
    written: that layer merges into its own copy (memory for one more weight) and unmerge_adapters
    puts the shared weight back, bit for bit. PEFT writes W + dW into the shared weight (it warns).
    While adapters are disabled the merge happens as in PEFT, and a forward before they are enabled
    again unmerges first (the disabled output is the base model's).
    """
    layers = _layers(model)
    for name, layer in layers.items():
        for adapter, block in layer.miss_block.items():
            if (adapter_names is None or adapter in adapter_names) and not torch.isfinite(block).all():
                raise ValueError(
                    f"layer {name!r}: adapter {adapter!r} block {tuple(block.shape)} holds NaN or Inf; "
                    "refusing to merge. Reload the adapter."
                )
    shared = shared_base_weights(model)
    _log_untied(layers, shared, adapter_names)
    # A failure part-way puts back the exact weights of the layers already merged (unmerging would
    # round them), and re-ties the weights this call untied; the copies are kept on the CPU until
    # every layer is done.
    done: list[tuple[nn.Module, torch.Tensor, list[str], bool]] = []
    failing = ""
    try:
        for layer_name, layer in layers.items():
            failing = layer_name
            weight = base_weight_of(layer)
            untie = layer_name in shared and bool(_to_merge(layer, adapter_names))
            done.append((layer, weight.detach().to("cpu", copy=True), list(layer.merged_adapters), untie))
            if isinstance(layer, MissLinear):
                layer.base_weight_shared = layer_name in shared or has_untied_weight(layer)
                layer.merge(adapter_names, untie=untie)
            else:
                if untie:
                    untie_base_weight(layer)  # PEFT's merge then writes into the copy
                layer.merge(safe_merge=True, adapter_names=adapter_names)
    except BaseException as error:
        with torch.no_grad():
            for layer, weight, merged, untied_here in done:
                if not (untied_here and retie_base_weight(layer)):
                    base_weight_of(layer).copy_(weight)
                layer.merged_adapters[:] = merged
        if isinstance(error, ValueError):
            raise ValueError(f"layer {failing!r}: {error}; no layer was merged") from None
        raise


def _log_untied(layers: dict[str, nn.Module], shared: dict[str, list[str]], adapter_names: list[str] | None) -> None:
    for name, layer in layers.items():
        if name in shared and _to_merge(layer, adapter_names):
            weight = base_weight_of(layer)
            logger.warning(
                "layer %r: its weight %s is read by %s; merging into the layer's own copy (%.1f MB more) so "
                "the others keep theirs; unmerge_adapters re-ties them", name, tuple(weight.shape),
                ", ".join(shared[name]), weight.numel() * weight.element_size() / 1e6)
    disabled = [name for name, layer in layers.items() if layer.disable_adapters and _to_merge(layer, adapter_names)]
    if disabled:
        logger.warning("merging while adapters are disabled on %d layers (%s...): the merge shows once they are "
                       "enabled again; a forward before that unmerges them first, as PEFT does",
                       len(disabled), disabled[0])


def unmerge_adapters(model: nn.Module) -> None:
    """Restore every base weight; checks every bat inverse first, so it is all layers or none."""
    layers = _layers(model)
    for name, layer in layers.items():
        if has_untied_weight(layer):
            continue  # merged into its own copy: un-merging puts the shared weight back, no inverse
        for adapter in layer.merged_adapters:
            if adapter_variant(layer, adapter) == "bat":
                try:
                    reference.check_bat_unmerge(layer.miss_block[adapter].detach())
                except ValueError as error:
                    raise ValueError(f"layer {name!r}, adapter {adapter!r}: {error}") from None
    for layer in layers.values():
        if isinstance(layer, MissLinear):
            if layer.merged:
                layer.unmerge()
        elif retie_base_weight(layer):
            layer.merged_adapters.clear()
        elif layer.merged:
            layer.unmerge()
