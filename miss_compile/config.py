"""MissConfig: what to adapt and how, with conversions to and from PEFT's MissConfig fields."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["MissConfig", "VARIANTS", "layer_index"]

VARIANTS = ("balance", "bat", "mini")
INITS = ("zeros", "random")
ALL_LINEAR = "all-linear"

Variant = Literal["balance", "bat", "mini"]

# Fields PEFT writes into a MiSS adapter_config.json; anything else is warned about on load.
PEFT_FIELDS = frozenset({
    "peft_type", "r", "mini_r", "miss_dropout", "init_weights", "target_modules", "exclude_modules",
    "bias", "modules_to_save", "layers_to_transform", "layers_pattern", "task_type", "inference_mode",
    "base_model_name_or_path", "revision", "auto_mapping", "peft_version", "target_parameters",
})

# The JSON type of every PEFT field (ranges are MissConfig.validate's): a wrong type is named on load.
_NUMBER, _NAMES, _TEXT = (int, float), (list, tuple, set, str), (str, type(None))
PEFT_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "r": ((int,), "a positive integer"),
    "mini_r": ((int,), "a positive integer"),
    "miss_dropout": (_NUMBER, "a number in [0, 1)"),
    "init_weights": ((bool, str), "true, false, 'bat' or 'mini'"),
    "target_modules": (_NAMES + (type(None),), "a list of module names, a regex or 'all-linear'"),
    "exclude_modules": (_NAMES + (type(None),), "a list of module names, a regex or null"),
    "bias": ((str,), "'none'"),
    "inference_mode": ((bool,), "true or false"),
    "task_type": (_TEXT, "a string or null"),
    "base_model_name_or_path": (_TEXT, "a string or null"),
    "revision": (_TEXT, "a string or null"),
    "peft_version": (_TEXT, "a string or null"),
    "auto_mapping": ((dict, type(None)), "an object or null"),
    "layers_to_transform": ((list, int, type(None)), "a list of layer indices, an index or null"),
    "layers_pattern": ((list, str, type(None)), "a string, a list of strings or null"),
    "modules_to_save": ((list, type(None)), "a list of module names or null"),
    "target_parameters": ((list, type(None)), "a list of parameter names or null"),
}


@dataclass
class MissConfig:
    """One MiSS adapter's settings.

    target_modules: a list of module-name suffixes, a regex (full match on the module name),
    or "all-linear" (every Linear / Conv1D except the model's output head).
    init: "zeros" (PEFT's default, the adapted model starts equal to the base) or "random"
    (PEFT's `init_weights=False`, Kaiming uniform). Only the block's starting value depends on it.
    modules_to_save: modules trained whole beside the adapter (a SEQ_CLS run's `score` / `classifier`
    head), PEFT's rule: a module whose name ends with an entry; saved under PEFT's keys.
    layers_to_transform / layers_pattern: PEFT's layer filter on a list of target_modules (an index or
    a list; the first number after `<pattern>.`, or after any segment without a pattern). As in PEFT,
    an exact module name in target_modules skips the filter; layers_pattern alone changes nothing.
    """

    r: int = 64
    variant: Variant = "balance"
    mini_r: int = 1
    dropout: float = 0.0
    target_modules: list[str] | str = ALL_LINEAR
    exclude_modules: list[str] | str | None = None
    init: Literal["zeros", "random"] = "zeros"
    modules_to_save: list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        for field_name in ("modules_to_save", "layers_to_transform", "layers_pattern"):
            value = getattr(self, field_name)
            if isinstance(value, (set, tuple)):
                value = list(value)
            if value == [] or value == "":  # PEFT treats an empty list (or pattern) as not given
                value = None
            setattr(self, field_name, value)
        self.validate()

    def validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"MissConfig.r must be a positive integer, got {self.r!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"MissConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if isinstance(self.mini_r, bool) or not isinstance(self.mini_r, int) or self.mini_r <= 0:
            raise ValueError(f"MissConfig.mini_r must be a positive integer, got {self.mini_r!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MissConfig.dropout must be a float in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"MissConfig.init must be one of {INITS}, got {self.init!r}")
        _check_module_selector("target_modules", self.target_modules, allow_none=False)
        _check_module_selector("exclude_modules", self.exclude_modules, allow_none=True)
        _check_modules_to_save(self.modules_to_save)
        _check_layer_selection(self.layers_to_transform, self.layers_pattern, self.target_modules)

    def check_layer(self, name: str, in_features: int, out_features: int) -> None:
        """The per-layer rules; raised at apply time with the layer's name and shape."""
        shape = f"layer {name!r} (in_features={in_features}, out_features={out_features})"
        if self.r > in_features:
            raise ValueError(f"{shape}: r={self.r} must be <= in_features; lower r or exclude the layer")
        if self.variant == "bat" and (in_features % self.r or out_features % self.r):
            raise ValueError(
                f"{shape}: variant 'bat' needs in_features and out_features divisible by r={self.r}; "
                "pick an r dividing both, use variant 'balance', or exclude the layer"
            )
        if self.variant == "mini" and out_features % self.mini_r:
            raise ValueError(
                f"{shape}: variant 'mini' needs out_features divisible by mini_r={self.mini_r}; "
                "pick a mini_r dividing out_features or exclude the layer"
            )

    def block_shape(self, in_features: int, out_features: int) -> tuple[int, ...]:
        if self.variant == "bat":
            return (out_features // self.r, self.r, self.r)
        if self.variant == "mini":
            return (self.r, self.mini_r)
        return (self.r, out_features)

    # --- module selection (PEFT's rules: exact name or ".suffix" for lists, fullmatch for regex)

    def is_excluded(self, name: str) -> bool:
        """exclude_modules, and (as PEFT) any module in or under one of modules_to_save: an adapter
        inside a module that is trained and saved whole would be trained twice."""
        if self.exclude_modules is not None and _selected(self.exclude_modules, name):
            return True
        return any(re.match(rf"(^|.*\.){key}($|\..*)", name) for key in self.modules_to_save or ())

    def selects(self, name: str) -> bool:
        """Whether a module name is targeted by target_modules (not for "all-linear"), with PEFT's
        `check_target_module_exists` rules: layers_to_transform filters suffix matches only."""
        if self.target_modules == ALL_LINEAR:
            raise ValueError("'all-linear' selects by module type, not by name")
        if self.is_excluded(name):
            return False
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        if name in self.target_modules:
            return True
        if not any(name.endswith("." + key) for key in self.target_modules):
            return False
        if self.layers_to_transform is None:
            return True
        index = layer_index(name, self.layers_pattern)
        wanted = self.layers_to_transform
        return index is not None and (index == wanted if isinstance(wanted, int) else index in wanted)

    # --- PEFT conversions

    def to_peft_dict(self) -> dict[str, Any]:
        """PEFT's MissConfig fields (the adapter_config.json of a PEFT checkpoint)."""
        if self.variant == "balance":
            init_weights: bool | str = self.init == "zeros"
        else:
            # PEFT starts bat and mini at zero; a random start is ours only and is carried by the weights.
            init_weights = self.variant
        return {
            "peft_type": "MISS",
            "r": self.r,
            "mini_r": self.mini_r,
            "miss_dropout": float(self.dropout),
            "init_weights": init_weights,
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "bias": "none",
            "modules_to_save": None if self.modules_to_save is None else list(self.modules_to_save),
            "layers_to_transform": _copy(self.layers_to_transform),
            "layers_pattern": _copy(self.layers_pattern),
        }

    def to_peft(self) -> Any:
        """A `peft.MissConfig` (needs the optional `peft` extra)."""
        try:
            import peft
        except ImportError as error:
            raise ImportError("MissConfig.to_peft needs PEFT: pip install 'miss-compile[peft]'") from error
        fields = self.to_peft_dict()
        fields.pop("peft_type")
        return peft.MissConfig(**fields)

    @classmethod
    def from_peft(cls, peft_config: Any) -> MissConfig:
        """From a `peft.MissConfig` or its JSON dict (adapter_config.json)."""
        fields = peft_config if isinstance(peft_config, Mapping) else dataclasses.asdict(peft_config)
        peft_type = str(getattr(fields.get("peft_type"), "value", fields.get("peft_type")))
        if peft_type != "MISS":
            raise ValueError(f"peft_type is {peft_type!r}, expected 'MISS': this is not a MiSS adapter")
        _check_peft_types(fields)
        if fields.get("target_parameters") not in (None, []):  # [] is PEFT's "none" too; 0 or "" are not
            raise ValueError(
                f"PEFT MissConfig.target_parameters={fields['target_parameters']!r} is not supported; "
                "target the modules with target_modules instead"
            )
        if fields.get("bias", "none") != "none":
            raise ValueError(f"PEFT MissConfig.bias={fields['bias']!r} is not supported; only 'none'")
        unknown = sorted(set(fields) - PEFT_FIELDS)
        if unknown:
            warnings.warn(f"ignoring fields unknown to PEFT's MissConfig: {unknown}", stacklevel=2)
        init_weights = fields.get("init_weights", True)
        if init_weights in ("bat", "mini"):
            variant, init = init_weights, "zeros"
        elif isinstance(init_weights, bool):
            variant, init = "balance", ("zeros" if init_weights else "random")
        else:
            raise ValueError(f"PEFT MissConfig.init_weights must be True, False, 'bat' or 'mini', got {init_weights!r}")
        target_modules = fields.get("target_modules")
        if target_modules is None:
            raise ValueError("PEFT MissConfig.target_modules is None; name the modules (or 'all-linear')")
        return cls(
            r=fields.get("r", 64),
            variant=variant,
            mini_r=fields.get("mini_r", 1),
            dropout=fields.get("miss_dropout", 0.0),
            target_modules=target_modules,
            exclude_modules=fields.get("exclude_modules"),
            init=init,
            modules_to_save=fields.get("modules_to_save"),
            layers_to_transform=fields.get("layers_to_transform"),
            layers_pattern=fields.get("layers_pattern"),
        )


def layer_index(name: str, layers_pattern: str | list[str] | None) -> int | None:
    """The layer index in a module name, found as PEFT finds it: the first number after a
    `<pattern>.` segment (any segment without a pattern), so `layers.1.experts.0.up` is layer 1."""
    if layers_pattern is None:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return None if match is None else int(match.group("idx"))


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def _check_modules_to_save(value: object) -> None:
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ValueError(f"MissConfig.modules_to_save must be a list of module names or None, got {value!r}")
    for item in value:
        try:
            re.compile(item)  # PEFT matches them as regexes when it excludes them from target_modules
        except re.error as error:
            raise ValueError(f"MissConfig.modules_to_save entry {item!r} is not a valid regex ({error})") from None


def _check_layer_selection(indices: object, pattern: object, target_modules: object) -> None:
    def is_index(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if indices is not None and not (is_index(indices) or (isinstance(indices, list) and all(map(is_index, indices)))):
        raise ValueError(
            f"MissConfig.layers_to_transform must be a layer index >= 0, a list of them or None, got {indices!r}"
        )
    if pattern is not None and not (
        isinstance(pattern, str) or (isinstance(pattern, list) and all(isinstance(p, str) and p for p in pattern))
    ):
        raise ValueError(f"MissConfig.layers_pattern must be a string, a list of strings or None, got {pattern!r}")
    if isinstance(target_modules, str) and (indices is not None or pattern is not None):
        # PEFT's MissConfig refuses this too: a regex or 'all-linear' already chooses the layers.
        raise ValueError(
            f"MissConfig.layers_to_transform / layers_pattern need target_modules as a list of module names, "
            f"got target_modules={target_modules!r}; list the names (e.g. ['q_proj', 'v_proj']) or fold the "
            "layer indices into the regex"
        )


def _check_peft_types(fields: Mapping[str, Any]) -> None:
    problems = []
    for key, (types, what) in PEFT_FIELD_TYPES.items():
        if key not in fields:
            continue
        value = fields[key]
        wrong_bool = isinstance(value, bool) and bool not in types  # JSON true is not a number here
        if wrong_bool or not isinstance(value, types):
            problems.append(f"{key} must be {what}, got {value!r} ({type(value).__name__})")
    if problems:
        raise ValueError("PEFT MissConfig fields of the wrong type: " + "; ".join(problems))


def _check_module_selector(field_name: str, value: object, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, str):
        if value == ALL_LINEAR and field_name == "target_modules":
            return
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"MissConfig.{field_name} is not a valid regex ({error}): {value!r}") from error
        return
    if isinstance(value, list) and value and all(isinstance(item, str) and item for item in value):
        return
    raise ValueError(
        f"MissConfig.{field_name} must be a non-empty list of module-name suffixes or a regex string"
        f"{' or None' if allow_none else ' or ' + repr(ALL_LINEAR)}, got {value!r}"
    )


def _selected(selector: list[str] | str, name: str) -> bool:
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    return any(name == key or name.endswith("." + key) for key in selector)

