"""MissLinear: a Linear (or GPT-2 Conv1D) carrying named MiSS adapters.

Attribute names follow PEFT's MissLayer (`base_layer`, `miss_block`, `miss_r`, `miss_mini_r`,
`miss_dropout`, `set_adapter`, `enable_adapters`, `merge`, `unmerge`), so model-level code and
checkpoints treat our layers and PEFT's alike. Unlike PEFT, each adapter keeps its own variant.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import ops, reference
from .config import MissConfig

__all__ = [
    "MissLinear", "base_features", "untie_base_weight", "retie_base_weight", "has_untied_weight", "carry_untied_weight",
]

logger = logging.getLogger(__name__)


def base_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a layer MiSS can adapt, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape  # Conv1D stores [in, out]
        return in_features, out_features
    return None


# Where untie_base_weight keeps the shared Parameter of a layer merged into its own copy. Set with
# object.__setattr__ so that it is no registered parameter: not in state_dict, not trained, not
# exported; deepcopy keeps it the same object as the module that still holds it.
_TIED_WEIGHT = "miss_tied_weight"


def _base_layer(layer: nn.Module) -> nn.Module:
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer.base_layer


def untie_base_weight(layer: nn.Module) -> None:
    """Give `layer`'s base layer (ours or PEFT's) its own copy of a weight that other modules also
    read, so that a merge writes W + dW there only; retie_base_weight puts the shared one back."""
    if has_untied_weight(layer):
        return  # already its own copy
    base = _base_layer(layer)
    shared = base.weight
    base.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
    object.__setattr__(layer, _TIED_WEIGHT, shared)


def has_untied_weight(layer: nn.Module) -> bool:
    """Whether `layer` merged into its own copy of a shared weight (unmerging re-ties, no inverse)."""
    return getattr(layer, _TIED_WEIGHT, None) is not None


def retie_base_weight(layer: nn.Module) -> bool:
    """Put back the shared weight untie_base_weight kept, exactly; False when there is none (or it no
    longer fits the layer: then the caller unmerges its own copy arithmetically)."""
    shared = getattr(layer, _TIED_WEIGHT, None)
    if shared is None:
        return False
    object.__setattr__(layer, _TIED_WEIGHT, None)
    base = _base_layer(layer)
    own = base.weight
    if (shared.shape, shared.dtype, shared.device) != (own.shape, own.dtype, own.device):
        # The model was moved or cast while merged and the kept Parameter was not (a new object).
        logger.warning("the weight shared with this layer became %s %s %s while merged (kept: %s %s %s); "
                       "unmerging into the layer's own copy instead of re-tying",
                       tuple(own.shape), own.dtype, own.device, tuple(shared.shape), shared.dtype, shared.device)
        return False
    base.weight = shared
    return True


def carry_untied_weight(source: nn.Module, target: nn.Module) -> None:
    """Hand the shared weight `source` kept (untie_base_weight) to `target`, a layer converted from
    it, so that unmerging `target` re-ties bit for bit too."""
    object.__setattr__(target, _TIED_WEIGHT, getattr(source, _TIED_WEIGHT, None))


class MissLinear(nn.Module):
    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        features = base_features(base_layer)
        if features is None:
            raise TypeError(f"MiSS adapts nn.Linear and transformers' Conv1D, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = features
        self.miss_block = nn.ParameterDict()
        self.miss_dropout = nn.ModuleDict()
        self.miss_variant: dict[str, str] = {}
        self.miss_r: dict[str, int] = {}
        self.miss_mini_r: dict[str, int] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        # Set by apply_miss / merge_adapters when another module reads the base weight too (a tied
        # output head): merging then goes into an untied copy (untie_base_weight).
        self.base_weight_shared = False
        object.__setattr__(self, _TIED_WEIGHT, None)
        # Many adapters in one batch (miss_compile.stacked): blocks stacked [n + 1, r, out], the last
        # one zeros ("no adapter"), and the ids of the current call, one per batch row.
        self.register_buffer("miss_stack", None, persistent=False)
        self.miss_stack_names: list[str] = []
        self.adapter_ids: torch.Tensor | None = None
        self.train(base_layer.training)

    # --- adapters

    def add_adapter(self, name: str, config: MissConfig, dtype: torch.dtype = torch.float32) -> None:
        if name in self.miss_block:
            raise ValueError(f"adapter {name!r} already exists on this layer; pick another adapter_name")
        if self.merged:
            raise ValueError(f"cannot add adapter {name!r} while {self.merged_adapters} are merged; unmerge first")
        shape = config.block_shape(self.in_features, self.out_features)
        block = torch.zeros(shape, dtype=dtype, device=self.base_weight().device)
        if config.init == "random":
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))  # PEFT's init_weights=False
        self.miss_block[name] = nn.Parameter(block)
        self.miss_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.miss_dropout[name].train(self.training)  # a model in eval mode stays in eval mode
        self.miss_variant[name] = config.variant
        self.miss_r[name] = config.r
        self.miss_mini_r[name] = config.mini_r
        if not self.active_adapters:
            self.set_adapter([name])
        else:
            self.miss_block[name].requires_grad_(False)

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"cannot remove adapter {name!r} while it is merged; unmerge first")
        del self.miss_block[name]
        del self.miss_dropout[name]
        for table in (self.miss_variant, self.miss_r, self.miss_mini_r):
            del table[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def set_adapter(self, names: str | list[str]) -> None:
        """Make `names` the active adapters (in this order); only they train."""
        names = [names] if isinstance(names, str) else list(names)
        if self.merged:
            logger.warning("unmerging %s before switching adapters to %s", self.merged_adapters, names)
            self.unmerge()
        for name, block in self.miss_block.items():
            block.requires_grad_(name in names)
        self.active_adapters = [name for name in names if name in self.miss_block]

    def enable_adapters(self, enabled: bool) -> None:
        if not enabled and self.merged:
            self.unmerge()
        self.disable_adapters = not enabled

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # --- base weight in Linear layout [out, in], whatever the base layer stores

    def base_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        return weight.t() if isinstance(self.base_layer, Conv1D) else weight

    @torch.no_grad()
    def _write_base_weight(self, weight: torch.Tensor) -> None:
        # In place: optimizers and compiled graphs keep the same Parameter. A weight other modules
        # read too is untied first (merge), so this never writes into theirs.
        self.base_weight().copy_(weight)

    # --- merge

    def merge(self, adapter_names: list[str] | None = None, untie: bool | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weight, in order.

        untie: merge into the layer's own copy of the base weight, because other modules read it
        (default: `base_weight_shared`, which apply_miss and merge_adapters set); unmerge re-ties.
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        names = [name for name in names if name in self.miss_block and name not in self.merged_adapters]
        weight = self.base_weight().detach()
        for name in names:
            block = self.miss_block[name].detach()
            if not torch.isfinite(block).all():
                raise ValueError(f"adapter {name!r} block {tuple(block.shape)} holds NaN or Inf; refusing to merge")
            weight = reference.merged_weight(weight, block, self.miss_variant[name])
        if not torch.isfinite(weight).all():
            raise ValueError(f"merging {names} gives NaN or Inf in the weight {tuple(weight.shape)}; base weight unchanged")
        shared = getattr(self, "base_weight_shared", False)  # absent on layers pickled before it existed
        if names and (shared if untie is None else untie):
            untie_base_weight(self)
        self._write_base_weight(weight)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Restore the base weight; all or nothing (bat refuses when its inverse is ill-conditioned).
        A weight merged into an untied copy gets its shared Parameter back, bit for bit."""
        if retie_base_weight(self):
            self.merged_adapters = []
            return
        weight = self.base_weight().detach()
        for name in reversed(self.merged_adapters):
            weight = reference.unmerged_weight(weight, self.miss_block[name].detach(), self.miss_variant[name])
        self._write_base_weight(weight)
        self.merged_adapters = []

    # --- forward

    @torch.compiler.disable
    def _unmerge_while_disabled(self) -> None:
        # Merged while disabled: the weight holds W + dW but the output must be the base one. PEFT
        # unmerges here too; run eagerly (a graph break), never traced as a weight mutation.
        logger.info("adapters are disabled: unmerging %s before the forward", self.merged_adapters)
        self.unmerge()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self._unmerge_while_disabled()
        if self.adapter_ids is not None and not self.disable_adapters:
            return self._stacked_forward(x)
        # Merged adapters are already in the weight; they are always active (set_adapter unmerges).
        names = [] if self.disable_adapters else [n for n in self.active_adapters if n not in self.merged_adapters]
        if not names:
            return self.base_layer(x)
        weight, bias = self.base_weight(), self.base_layer.bias
        blocks = [self.miss_block[name] for name in names]
        variants = {self.miss_variant[name] for name in names}
        if "bat" not in variants:
            # PEFT's order: cast x to the block's dtype, then dropout.
            adapter_inputs = [self.miss_dropout[name](x.to(block.dtype)) for name, block in zip(names, blocks, strict=True)]
            return ops.miss_linear(x, adapter_inputs, weight, bias, blocks)
        if variants == {"bat"}:
            return ops.bat_linear(x, weight, bias, blocks)  # bat has no dropout, as in PEFT
        # bat mixed with balance/mini on one layer: the reference fold (no single op expresses it).
        terms = [(block, self.miss_variant[name]) for name, block in zip(names, blocks, strict=True)]
        return reference.forward(x, weight, bias, terms, [self.miss_dropout[name] for name in names])

    def _stacked_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.miss_stack is None:
            raise ValueError(f"adapter_ids given, but this layer {self.extra_repr()} has no adapter stack; "
                             "call miss_compile.stack_adapters(model) first")
        if self.merged:
            raise ValueError(f"adapter_ids given while {self.merged_adapters} are merged into the weight; unmerge first")
        if self.training and any(self.miss_dropout[name].training and isinstance(self.miss_dropout[name], nn.Dropout)
                                 for name in self.miss_stack_names if name in self.miss_dropout):
            raise ValueError("adapter stacks are for inference and apply no dropout; call model.eval() first")
        if x.dim() < 2 or self.adapter_ids.shape[0] != x.shape[0]:
            raise ValueError(f"adapter_ids hold {self.adapter_ids.shape[0]} ids, but the input {tuple(x.shape)} of this "
                             f"layer ({self.extra_repr()}) has batch {x.shape[0] if x.dim() >= 2 else 'none'}; "
                             "pass one id (or name) per batch row")
        return ops.stacked_linear(x, self.adapter_ids, self.base_weight(), self.base_layer.bias, self.miss_stack)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: {self.miss_variant[n]} r={self.miss_r[n]}" for n in self.miss_block)
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{adapters}]"
