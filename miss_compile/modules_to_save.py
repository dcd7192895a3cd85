"""modules_to_save on a model: find the modules PEFT's way and give an adapter its trainable copies.

The wrapper itself (SavedModule) and reading copies out are `saved_modules`; this module adds the
parts that need to know the model's MiSS layers (which adapter is active, what not to wrap).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .config import MissConfig
from .peft_compat import is_miss_layer, layers_with, model_root, peft_tuner
from .saved_modules import SavedModule, is_saved_module

__all__ = ["find_modules_to_save", "wrap_modules_to_save"]


def find_modules_to_save(root: nn.Module, config: MissConfig) -> dict[str, nn.Module]:
    """name -> module (or its wrapper) that `config.modules_to_save` names, with PEFT's rule (the
    module name ends with an entry); empty when the config names none. Nothing matching at all is an
    error: the trained module would silently be missing."""
    if not config.modules_to_save:
        return {}
    found: dict[str, nn.Module] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        if not name or any(name.startswith(prefix + ".") for prefix in found):
            continue
        if not any(name.endswith(entry) for entry in config.modules_to_save):
            continue
        parent_name = name.rpartition(".")[0]
        if any(is_miss_layer(m) or is_saved_module(m) for m in _ancestors(root, parent_name)):
            raise ValueError(
                f"modules_to_save={config.modules_to_save} names {name!r}, a part of an adapter layer or of another "
                "saved module; rename the adapter or make the modules_to_save entries more specific"
            )
        if is_miss_layer(module):
            raise ValueError(f"modules_to_save names {name!r}, which carries MiSS adapters; a module is either "
                             "adapted or trained whole: remove it from target_modules or modules_to_save")
        found[name] = module
    if not found:
        raise ValueError(
            f"modules_to_save={config.modules_to_save} matches no module of {type(root).__name__}; the modules "
            "would not be trained nor saved. Check the names with model.named_modules()"
        )
    return found


def _ancestors(root: nn.Module, name: str) -> list[nn.Module]:
    modules, path = [root], ""
    for part in name.split(".") if name else ():
        path = f"{path}.{part}" if path else part
        modules.append(root.get_submodule(path))
    return modules


def _state_in_model(root: nn.Module, adapter_name: str) -> tuple[bool, bool]:
    """(active, disabled) of `adapter_name` on the model's MiSS layers, for its new copies to follow."""
    layers = layers_with(root, adapter_name).values()
    active = any(adapter_name in layer.active_adapters for layer in layers)
    return active, any(layer.disable_adapters for layer in layers)


def wrap_modules_to_save(model: nn.Module, config: MissConfig, adapter_name: str) -> Callable[[], None]:
    """Give `adapter_name` its own trainable copy of every module `config.modules_to_save` names
    (wrapping it in a SavedModule first); the copy runs while the adapter is active on the model's
    MiSS layers. Modules that already hold a copy for it are kept (a PEFT model gets its copies from
    PEFT when the adapter is added). Returns a function that undoes exactly what this call did.
    Call it on our models after the adapter's MiSS layers exist."""
    root = model_root(model)
    found = find_modules_to_save(root, config)
    missing = [name for name, module in found.items()
               if not (is_saved_module(module) and adapter_name in module.modules_to_save)]
    if missing and peft_tuner(model) is not None:
        raise ValueError(
            f"the PEFT model's adapter {adapter_name!r} has no modules_to_save copy of {missing}; PEFT adds them "
            "when an adapter is added with modules_to_save: load into a new adapter_name (or PeftModel.from_pretrained)"
        )
    active, disabled = _state_in_model(root, adapter_name)
    undo: list[Callable[[], None]] = []
    try:
        for name in missing:
            module = found[name]
            if not isinstance(module, SavedModule):
                undo.append(_unwrapper(root, name, module))
                module = SavedModule(module)
                module.disable_adapters = disabled
                _set_module(root, name, module)
            module.add_adapter(adapter_name, active)
            undo.append(lambda wrapper=module: wrapper.remove_adapter(adapter_name))
    except BaseException:
        _run(undo)
        raise
    return lambda: _run(undo)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(root.get_submodule(parent_name), child_name, module)


def _unwrapper(root: nn.Module, name: str, original: nn.Module) -> Callable[[], None]:
    """What puts `original` back in place of its wrapper, trainable as it was."""
    flags = [(param, param.requires_grad) for param in original.parameters()]

    def unwrap() -> None:
        _set_module(root, name, original)
        for param, flag in flags:
            param.requires_grad_(flag)

    return unwrap


def _run(undo: list[Callable[[], None]]) -> None:
    for step in reversed(undo):
        step()
