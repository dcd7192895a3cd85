"""One adapter name, one config: the per-layer settings of an adapter must agree across layers.

A PEFT checkpoint holds one `r`, `mini_r`, dropout and variant per adapter name, so an adapter whose
layers disagree cannot be written as one (neither we nor PEFT could load it back). `save_adapter`
refuses such an adapter, and `apply_miss` refuses to create one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .config import MissConfig
from .peft_compat import adapter_variant, layers_with

__all__ = ["AdapterSettings", "settings_of", "check_consistent", "check_same_settings"]


@dataclass(frozen=True)
class AdapterSettings:
    """What an adapter_config.json fixes for every layer of one adapter."""

    r: int
    mini_r: int
    dropout: float
    variant: str

    @classmethod
    def of_config(cls, config: MissConfig) -> AdapterSettings:
        return cls(r=config.r, mini_r=config.mini_r, dropout=float(config.dropout), variant=config.variant)

    def __str__(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in asdict(self).items())


def settings_of(layer: nn.Module, adapter_name: str) -> AdapterSettings:
    """The settings of `adapter_name` on one MiSS layer (ours or PEFT's)."""
    dropout = layer.miss_dropout[adapter_name]
    return AdapterSettings(
        r=layer.miss_r[adapter_name],
        mini_r=layer.miss_mini_r[adapter_name],
        dropout=float(getattr(dropout, "p", 0.0)),  # nn.Identity when the dropout is 0
        variant=adapter_variant(layer, adapter_name),
    )


def _grouped(layers: dict[str, nn.Module], adapter_name: str) -> dict[AdapterSettings, list[str]]:
    groups: dict[AdapterSettings, list[str]] = {}
    for name, layer in layers.items():
        groups.setdefault(settings_of(layer, adapter_name), []).append(name)
    return groups


def _listing(groups: dict[AdapterSettings, list[str]]) -> str:
    def names(layer_names: list[str]) -> str:
        return str(layer_names[:4])[:-1] + (f", ... {len(layer_names) - 4} more]" if len(layer_names) > 4 else "]")

    return "; ".join(f"{settings} on {names(layer_names)}" for settings, layer_names in groups.items())


def check_consistent(layers: dict[str, nn.Module], adapter_name: str) -> AdapterSettings:
    """The one settings of `adapter_name` on `layers` (layer name -> MiSS layer carrying it); a
    ValueError naming each group of layers and its values when they disagree."""
    groups = _grouped(layers, adapter_name)
    if len(groups) > 1:
        raise ValueError(
            f"adapter {adapter_name!r} has different settings on different layers: {_listing(groups)}. "
            "A PEFT checkpoint holds one r, mini_r, dropout and variant per adapter, so this adapter cannot be "
            "saved as one: add each setting under its own adapter name (apply_miss(..., adapter_name=...)) "
            "and save each name separately"
        )
    return next(iter(groups))


def check_same_settings(model: nn.Module, config: MissConfig, adapter_name: str) -> None:
    """For apply_miss, before the model is touched: adding `adapter_name` with `config` to more layers
    must not give the name a second set of settings (the adapter could not be saved)."""
    layers = layers_with(model, adapter_name)
    if not layers:
        return
    new = AdapterSettings.of_config(config)
    groups = _grouped(layers, adapter_name)
    if set(groups) != {new}:
        raise ValueError(
            f"adapter {adapter_name!r} already exists with {_listing(groups)}; adding it with {new} would give one "
            "adapter two configs, which no checkpoint can hold. Use the same settings, or another adapter_name"
        )
