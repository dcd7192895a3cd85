"""modules_to_save: whole modules (a classifier head) trained and saved beside a MiSS adapter.

PEFT wraps each in a `ModulesToSaveWrapper`: the untouched original plus one trainable copy per
adapter; with adapters disabled (or none of its adapters active) the original runs, else the active
adapter's copy. `SavedModule` is ours, with PEFT's attribute names (`original_module`,
`modules_to_save.<adapter>`), so state_dict keys and checkpoint keys are PEFT's:
`base_model.model.<module>.<param>` (e.g. `base_model.model.score.weight`). Both wrappers are read
alike here. Only one adapter's copy can be active in a wrapper (which head would run otherwise?).
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Iterable

import torch
from torch import nn

__all__ = [
    "SavedModule",
    "is_saved_module",
    "saved_module_wrappers",
    "saved_tensors",
    "saved_targets",
    "running_saved_copies",
    "set_saved_adapters",
    "enable_saved_modules",
    "from_peft_wrapper",
    "refuse_per_row_selection",
    "is_saved_module_parameter",
]


class SavedModule(nn.Module):
    """A module trained whole for some adapters: one copy per adapter, the original when disabled."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module.requires_grad_(False)
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disable_adapters = False

    def add_adapter(self, name: str, active: bool) -> None:
        if name in self.modules_to_save:
            raise ValueError(f"modules_to_save already holds a copy for adapter {name!r}; pick another adapter_name")
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        self.set_adapter(self.active_adapters + [name] if active else self.active_adapters)

    def remove_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def set_adapter(self, names: str | Iterable[str]) -> None:
        """Activate the copy of the one adapter in `names` that has one (none: the original runs)."""
        names = [names] if isinstance(names, str) else list(names)
        active = [name for name in names if name in self.modules_to_save]
        if len(active) > 1:
            raise ValueError(
                f"adapters {active} each train their own copy of this module ({type(self.original_module).__name__}); "
                "only one can run at a time: activate one of them (PEFT has the same rule)"
            )
        self.active_adapters = active
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name in active)

    def enable_adapters(self, enabled: bool) -> None:
        self.disable_adapters = not enabled

    @property
    def active_module(self) -> nn.Module:
        if self.disable_adapters or not self.active_adapters:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str) -> object:
        # `.weight`, `.out_features` ... of the module that runs, as PEFT's wrapper does.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_modules" not in self.__dict__ or "active_adapters" not in self.__dict__:
                raise
        return getattr(self.active_module, name)

    def extra_repr(self) -> str:
        return f"adapters={list(self.modules_to_save)}, active={self.active_adapters}"


def _peft_wrapper_type() -> type | None:
    peft = sys.modules.get("peft")
    return None if peft is None else peft.utils.other.ModulesToSaveWrapper


def is_saved_module(module: nn.Module) -> bool:
    """Ours or PEFT's ModulesToSaveWrapper."""
    peft_type = _peft_wrapper_type()
    return isinstance(module, SavedModule) or (peft_type is not None and isinstance(module, peft_type))


def saved_module_wrappers(root: nn.Module) -> dict[str, nn.Module]:
    """Every modules_to_save wrapper under `root` (the transformers model), by module name."""
    return {name: module for name, module in root.named_modules() if is_saved_module(module)}


def saved_targets(root: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Checkpoint-relative key (`<module>.<param>`) -> the live tensor of `adapter_name`'s copies."""
    return {
        f"{name}.{key}": value
        for name, wrapper in saved_module_wrappers(root).items()
        if adapter_name in wrapper.modules_to_save
        for key, value in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items()
    }


def saved_tensors(root: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """What a checkpoint holds for `adapter_name`'s copies (PEFT's keys less `base_model.model.`)."""
    return {key: value.detach() for key, value in saved_targets(root, adapter_name).items()}


def running_saved_copies(root: nn.Module) -> dict[str, str]:
    """Module name -> the adapter whose trained copy runs there now (wrappers running their original left out)."""
    running = {}
    for name, wrapper in saved_module_wrappers(root).items():
        ours = wrapper if isinstance(wrapper, SavedModule) else from_peft_wrapper(wrapper)
        if ours.active_module is not ours.original_module:
            running[name] = ours.active_adapters[0]
    return running


def set_saved_adapters(root: nn.Module, names: str | list[str]) -> None:
    """set_active_adapters for our wrappers (PEFT's are set by PEFT's own set_adapter)."""
    names = [names] if isinstance(names, str) else list(names)
    wrappers = {n: w for n, w in saved_module_wrappers(root).items() if isinstance(w, SavedModule)}
    for name, wrapper in wrappers.items():  # every wrapper checked before any changes: all or nothing
        both = [adapter for adapter in names if adapter in wrapper.modules_to_save]
        if len(both) > 1:
            raise ValueError(f"adapters {both} each train their own copy of {name!r} (modules_to_save); only one "
                             "can run at a time: activate one of them, or only one with modules_to_save")
    for wrapper in wrappers.values():
        wrapper.set_adapter(names)


def enable_saved_modules(root: nn.Module, enabled: bool) -> None:
    for wrapper in saved_module_wrappers(root).values():
        wrapper.enable_adapters(enabled)


def refuse_per_row_selection(root: nn.Module, what: str) -> None:
    """For per-row adapter selection (stacked adapters, adapter_ids): each row would need its own
    adapter's copy, but a wrapper runs one module for the whole batch, so rows of other adapters
    would get the wrong head. Refused while any adapter holds a copy."""
    holders = {name: sorted(wrapper.modules_to_save) for name, wrapper in saved_module_wrappers(root).items()
               if len(wrapper.modules_to_save)}
    if holders:
        raise ValueError(
            f"{what}: adapters train their own copies of {holders} (modules_to_save), and one batch runs one copy "
            "for every row, so rows of other adapters would get the wrong module. Serve such adapters one per "
            "batch (set_active_adapters), or export each one separately"
        )


def from_peft_wrapper(peft_wrapper: nn.Module) -> SavedModule:
    """Our SavedModule with PEFT's original, copies, active adapter and disabled flag (PEFT runs the
    original when any active adapter lacks a copy: so do we)."""
    wrapper = SavedModule(peft_wrapper.original_module)
    for name, module in peft_wrapper.modules_to_save.items():
        wrapper.modules_to_save[name] = module
    active = list(peft_wrapper.active_adapters)
    wrapper.active_adapters = active if all(name in wrapper.modules_to_save for name in active) else []
    wrapper.disable_adapters = bool(peft_wrapper.disable_adapters)
    return wrapper


def is_saved_module_parameter(name: str) -> bool:
    """Whether a parameter name (model.named_parameters()) is a modules_to_save copy's."""
    return re.search(r"(^|\.)modules_to_save\.", name) is not None
