"""Many adapters in one batch: every layer's blocks stacked, one adapter id per batch row.

    model = stack_adapters(model)                       # ours in place; a PEFT model as a converted copy
    logits = model(input_ids, adapter_names=["a", "b", None, "a"]).logits   # None: no adapter
    logits = model(input_ids, adapter_ids=torch.tensor([0, 1, NO_ADAPTER, 0])).logits

Each MissLinear holds `miss_stack` [n + 1, R, out]: block k of the model's k-th stacked adapter in
its balance form (mini's [r, mini_r] repeated along out), a zero block for an adapter this layer
lacks, and a zero block last, so id -1 (NO_ADAPTER) wraps onto it in torch and in ONNX's Gather.

Which adapters can share a stack, and why (S_r is the chunk sum of DESIGN.md with chunk r):
- balance and mini, any mix: mini's block repeated along out IS a balance block (exact).
- ranks r_1..r_k: the stack rank R is lcm(r_1..r_k) (the largest rank when it is a multiple of the
  others). A rank-r block becomes R rows by repeating it, D_R[j] = D_r[j % r]: exact for every
  in_features, since (i % R) % r = i % r when r | R, and the zero padding of x adds nothing.
  Zero rows are NOT exact: [D_r; 0] gives dW[o, i] = 0 wherever i % R >= r, where the adapter
  has D_r[i % r, o]. So ranks are never zero-padded, and no rank R other than a common multiple
  is allowed.
- bat: refused. Its update W_pq @ D_p + D_p depends on W, so a row's output needs its own
  merged weight; there is no chunk-sum form to gather.
- blocks of different dtypes: refused (a shared stack would change one adapter's rounding).
The stack is built from the blocks as they are; each selecting call compares every layer's blocks
(identity, `_version`, storage) with those stacked and restacks when any changed in place, was
added or removed, or a layer was adapted since (enable_adapter_selection: stack on first use).

Under torch.compile the name-to-id lookup runs eagerly (a graph break ahead of the model), so
neither the names nor the mix of a batch is guarded on; ids reach the graph as a tensor read from
the layers. Setting ids on the layers makes one model unsafe to call from several threads at once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from . import reference
from .layer import MissLinear
from .peft_compat import from_peft, named_miss_layers, peft_tuner
from .saved_modules import refuse_per_row_selection

__all__ = ["NO_ADAPTER", "stack_adapters", "stack_blocks", "adapter_ids_for", "stacked_layers", "has_stacks",
           "enable_adapter_selection", "stale_stacks", "refresh_stacks"]

logger = logging.getLogger(__name__)

NO_ADAPTER = -1


def stack_blocks(layer_name: str, out_features: int, blocks: Sequence[tuple[str, torch.Tensor | None, str]],
                 rank: int | None = None) -> torch.Tensor:
    """[n + 1, R, out] from (adapter, block or None, variant) triples; the last block is zeros."""
    _check_rank(rank)
    present = [(name, block, variant) for name, block, variant in blocks if block is not None]
    if not present:
        raise ValueError(f"layer {layer_name!r}: none of the adapters {[b[0] for b in blocks]} is on it; "
                         "stack_adapters gives such a layer a zero stack")
    bat = [name for name, _, variant in present if variant == "bat"]
    if bat:
        raise ValueError(
            f"layer {layer_name!r}: adapter(s) {bat} are bat; bat's update depends on the base weight, so a "
            "batch row would need its own merged weight. Stack balance/mini adapters only, and serve bat "
            "adapters one at a time (set_active_adapters, or a merged model per adapter)"
        )
    dtypes = {name: block.dtype for name, block, _ in present}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"layer {layer_name!r}: blocks of different dtypes {dtypes}; cast them to one dtype first")
    ranks = {name: block.shape[0] for name, block, _ in present}
    common = math.lcm(*ranks.values())
    rank = common if rank is None else rank
    uneven = {name: r for name, r in ranks.items() if rank % r}
    if uneven:
        raise ValueError(
            f"layer {layer_name!r}: stack rank {rank} is not a multiple of the ranks {uneven}; a rank-r block "
            f"is exact at rank R only when r divides R (zero-padded rows are not). Use rank={common} "
            "(the least common multiple), or stack these adapters separately"
        )
    if rank > max(ranks.values()):
        logger.info("layer %r: ranks %s stacked at rank %d (their least common multiple)", layer_name, ranks, rank)
    dtype, device = present[0][1].dtype, present[0][1].device
    stack = torch.zeros(len(blocks) + 1, rank, out_features, dtype=dtype, device=device)
    for index, (_, block, variant) in enumerate(blocks):
        if block is not None:
            expanded = reference.expand_block(block.detach(), variant, out_features)
            stack[index] = expanded.repeat(rank // block.shape[0], 1)  # D_R[j] = D_r[j % r]
    return stack


def _check_rank(rank: int | None) -> None:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"stack rank {rank!r} must be a positive int, or None for each layer's least common multiple")


def _is_stacked(layer: nn.Module) -> bool:
    return isinstance(layer, MissLinear) and layer.miss_stack is not None


def stacked_layers(model: nn.Module) -> list[MissLinear]:
    return [layer for layer in named_miss_layers(model).values() if _is_stacked(layer)]


def has_stacks(model: nn.Module) -> bool:
    """True once stack_adapters (or a selecting call) stacked `model`'s adapters: its forward takes adapter_ids."""
    return bool(getattr(model, "_miss_stack_hook", False))


def stack_adapters(model: nn.Module, adapter_names: Sequence[str] | None = None, rank: int | None = None) -> nn.Module:
    """Stack `adapter_names` (default: every adapter) on every MiSS layer, ids in that order, and
    let `model(..., adapter_names=[...])` / `model(..., adapter_ids=...)` pick one per batch row.

    Our models change in place and are returned; a PEFT MiSS model is converted to our layers
    (a copy, from_peft) and the copy is returned. `rank` forces the stack rank R of every layer
    (default: the lcm of a layer's ranks). Nothing is changed when a layer refuses. Stacks follow
    later changes: a selecting call restacks (same names, or every adapter when none were given).
    """
    _check_rank(rank)
    if peft_tuner(model) is not None:
        model = from_peft(model)
    _stack(model, adapter_names, rank)
    model._miss_stack_request = (None if adapter_names is None else list(adapter_names), rank)
    return model


def _stack(model: nn.Module, adapter_names: Sequence[str] | None, rank: int | None) -> None:
    layers = {name: layer for name, layer in named_miss_layers(model).items() if isinstance(layer, MissLinear)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MiSS layers; add adapters with apply_miss or load_adapter")
    known = list(dict.fromkeys(name for layer in layers.values() for name in layer.miss_block))
    names = known if adapter_names is None else list(adapter_names)
    unknown = [name for name in names if name not in known]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"cannot stack {names}: unknown or repeated names {unknown or names}; the model has {known}")
    refuse_per_row_selection(model, "stack_adapters")  # one head would run for every row
    stacks = {}
    for layer_name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"layer {layer_name!r} has merged adapters {layer.merged_adapters}; unmerge before stacking")
        triples = [(name, layer.miss_block[name] if name in layer.miss_block else None, layer.miss_variant.get(name, ""))
                   for name in names]
        if any(block is not None for _, block, _ in triples):
            stacks[layer_name] = stack_blocks(layer_name, layer.out_features, triples, rank)
        else:  # none of these adapters targets this layer: every id is a zero block, the base output exactly
            stacks[layer_name] = layer.base_weight().new_zeros(len(names) + 1, rank or 1, layer.out_features)
    for layer_name, layer in layers.items():
        layer.miss_stack = stacks[layer_name]
        layer.miss_stack_names = names
        layer.adapter_ids = None
    model.miss_stack_names = names
    model._miss_stacked_state = _stack_state(named_miss_layers(model))
    model._miss_stack_hook = True  # has_stacks: export_onnx asks it
    _install_selection_hooks(model)
    logger.info("stacked adapters %s on %d layers", names, len(layers))


def _install_selection_hooks(model: nn.Module) -> None:
    if not getattr(model, "_miss_selection_hook", False):
        model._miss_layers_given_ids = []
        model.register_forward_pre_hook(_select_adapters, with_kwargs=True)
        model.register_forward_hook(_clear_adapters, always_call=True)  # ids never outlive the call that set them
        model._miss_selection_hook = True


def enable_adapter_selection(model: nn.Module) -> nn.Module:
    """Let `model(..., adapter_names=[...])` / `adapter_ids=` pick an adapter per batch row without an
    explicit stack_adapters: the first selecting call stacks every adapter that can be stacked, and
    later ones restack when blocks changed. Idempotent; returns `model`. Without these keywords the
    model runs its active adapters as before, and nothing is stacked.

    A live PEFT model gets a hook that refuses the keywords instead: PEFT drops `adapter_names` for
    MiSS (every row would silently run the active adapter) and our stacks need our layers."""
    if peft_tuner(model) is not None:
        if not getattr(model, "_miss_selection_hook", False):
            model.register_forward_pre_hook(_refuse_peft_selection, with_kwargs=True)
            model._miss_selection_hook = True
        return model
    _install_selection_hooks(model)
    return model


def _refuse_peft_selection(model: nn.Module, args: tuple, kwargs: dict) -> None:
    if kwargs.get("adapter_names") is not None or kwargs.get("adapter_ids") is not None:
        raise ValueError(f"{type(model).__name__} is a PEFT model: PEFT ignores adapter_names for MiSS adapters, so "
                         "every row would run the active adapter. Serve mixed batches from "
                         "miss_compile.stack_adapters(model), which returns a converted model that selects per row")


def _stack_state(layers: dict[str, nn.Module]) -> dict[str, tuple]:
    """What a stack was built from: each layer and each block's identity, in-place version and storage."""
    return {name: (id(layer), tuple((adapter, id(block), block._version, block.data_ptr(), block.shape)
                                    for adapter, block in layer.miss_block.items()))
            for name, layer in layers.items()}


def stale_stacks(model: nn.Module) -> bool:
    """True when `model`'s blocks or MiSS layers changed since its adapters were stacked (or were never stacked)."""
    return _changed_since_stacked(model, named_miss_layers(model))


def _changed_since_stacked(model: nn.Module, layers: dict[str, nn.Module]) -> bool:
    return getattr(model, "_miss_stacked_state", None) != _stack_state(layers)


def _bat_adapters(layers: dict[str, nn.Module]) -> set[str]:
    """The adapters that are bat on some layer (bat cannot share a stack)."""
    return {name for layer in layers.values() for name, variant in getattr(layer, "miss_variant", {}).items()
            if variant == "bat"}


def _stackable(layers: dict[str, nn.Module]) -> list[str]:
    """Every adapter, in the order first seen, but the bat ones."""
    names = dict.fromkeys(name for layer in layers.values() for name in layer.miss_block)
    bat = _bat_adapters(layers)
    return [name for name in names if name not in bat]


def _restack(model: nn.Module, layers: dict[str, nn.Module], by_ids: bool) -> None:
    """Stack again from the current blocks: the names asked for at stack_adapters, else every
    stackable adapter, kept in their old order with new ones appended (so existing ids keep their meaning)."""
    requested, rank = getattr(model, "_miss_stack_request", (None, None))
    old = getattr(model, "miss_stack_names", None) or []
    if requested is None:
        stackable = _stackable(layers)
        names = [name for name in old if name in stackable] + [name for name in stackable if name not in old]
    else:
        names = requested
    if by_ids and names[:len(old)] != old:
        raise ValueError(f"the adapters changed since the stack {old} was built; it is now {names}, so adapter_ids "
                         "built for the old stack would pick other adapters. Build them again with "
                         "miss_compile.adapter_ids_for(model, names), or pass adapter_names=[...]")
    logger.info("restacking adapters %s: blocks or layers changed since %s were stacked", names, old)
    _stack(model, names, rank)


def refresh_stacks(model: nn.Module) -> bool:
    """Restack `model` if its blocks or MiSS layers changed since it was stacked; True when it did.
    A model never stacked is left alone. Selecting calls, adapter_ids_for and write_onnx_stack do it
    first; an export of a stacked model should too (torch.export traces the stacks as they are)."""
    if getattr(model, "miss_stack_names", None) is None:
        return False
    layers = named_miss_layers(model)
    if not _changed_since_stacked(model, layers):
        return False
    _restack(model, layers, by_ids=False)
    return True


def adapter_ids_for(model: nn.Module, adapter_names: Sequence[str | None], device: Any = None) -> torch.Tensor:
    """The ids of `adapter_names` in `model`'s stack (None -> NO_ADAPTER), as an int64 tensor;
    restacked first if blocks changed (ids of adapters already stacked keep their meaning)."""
    refresh_stacks(model)
    return _ids_for(model, adapter_names, device)


def _ids_for(model: nn.Module, adapter_names: Sequence[str | None], device: Any = None) -> torch.Tensor:
    stacked = getattr(model, "miss_stack_names", None)
    if stacked is None:
        raise ValueError(f"{type(model).__name__} has no adapter stacks; call miss_compile.stack_adapters(model) first")
    if isinstance(adapter_names, str):
        raise TypeError(f"adapter_names={adapter_names!r} is one string; pass one name per batch row, "
                        f"e.g. [{adapter_names!r}] * batch")
    index = {name: i for i, name in enumerate(stacked)}
    unknown = sorted({name for name in adapter_names if name is not None and name not in index})
    if unknown:
        raise ValueError(f"adapter_names holds {unknown}, not in the stack {stacked}{_why_not_stacked(model, unknown)}")
    ids = [NO_ADAPTER if name is None else index[name] for name in adapter_names]
    return torch.tensor(ids, dtype=torch.int64, device=device)


def _why_not_stacked(model: nn.Module, names: list[str]) -> str:
    layers = named_miss_layers(model)
    bat = sorted(_bat_adapters(layers) & set(names))
    if bat:
        return (f"; {bat} are bat on some layers and bat cannot share a stack (its update depends on W): "
                "serve them one at a time with set_active_adapters")
    if any(name in layer.miss_block for layer in layers.values() for name in names):
        return "; they were left out at stack_adapters(model, names): stack again with them"
    return "; the model has no such adapter (use None for no adapter)"


def _check_ids(model: nn.Module, ids: Any, layers: list[MissLinear]) -> torch.Tensor:
    """Once per call, outside any graph: the ids a stacked forward can serve exactly, on the stacks' device.
    (torch.export traces this hook with fake ids: their values are checked at run time, by onnxruntime's Gather.)"""
    names = model.miss_stack_names
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"adapter_ids must be a tensor, got {type(ids).__name__}; build it with "
                        "miss_compile.adapter_ids_for(model, names), or pass adapter_names=[...]")
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"adapter_ids must be a 1-D int64 (or int32) tensor, one id per batch row; got "
                         f"{ids.dtype} of shape {tuple(ids.shape)}")
    if ids.numel() and not is_fake(ids) and not (NO_ADAPTER <= int(ids.min()) and int(ids.max()) < len(names)):
        raise ValueError(f"adapter_ids {ids.tolist()}: ids run from 0 to {len(names) - 1} over the stack {names}, "
                         f"and {NO_ADAPTER} (NO_ADAPTER) means no adapter")
    return ids.to(device=layers[0].miss_stack.device, dtype=torch.int64)


def _select_adapters(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook. Without adapter_names / adapter_ids it does nothing (and traces to nothing
    under torch.compile, fullgraph included); with them, the eager part below runs outside the graph."""
    if "adapter_names" not in kwargs and "adapter_ids" not in kwargs:
        return None
    return _select_adapters_eagerly(model, args, kwargs)


def _clear_adapters(model: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook (always called, errors included): a later call of a submodule alone must not
    reuse this call's per-row adapters. Only the layers this call gave ids: no walk over the model."""
    if getattr(model, "_miss_layers_given_ids", None):
        _clear_given_ids(model)


@torch.compiler.disable
def _select_adapters_eagerly(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Pops adapter_names / adapter_ids, restacks stale stacks, checks the ids and sets them on every stacked layer."""
    names, ids = kwargs.pop("adapter_names", None), kwargs.pop("adapter_ids", None)
    if names is not None and ids is not None:
        raise ValueError("pass adapter_names or adapter_ids, not both")
    every = named_miss_layers(model)  # one walk over the model per call
    selecting = names is not None or ids is not None
    # Tracing (torch.export's fake ids) uses the stacks as they are: no new tensors inside a trace.
    if selecting and not (isinstance(ids, torch.Tensor) and is_fake(ids)) and _changed_since_stacked(model, every):
        _restack(model, every, by_ids=ids is not None)
        every = named_miss_layers(model)
    layers = [layer for layer in every.values() if _is_stacked(layer)]
    if selecting:
        unstacked = [name for name, layer in every.items() if not _is_stacked(layer)]
        if unstacked:
            raise ValueError(f"layer {unstacked[0]!r} has MiSS adapters but no stack (adapted after stack_adapters?), "
                             "so it would give every row its active adapter; call miss_compile.stack_adapters(model) again")
        ids = _ids_for(model, names) if names is not None else ids
        ids = _check_ids(model, ids, layers)
    for layer in layers:
        layer.adapter_ids = ids
    model._miss_layers_given_ids = layers if ids is not None else []
    return args, kwargs


@torch.compiler.disable
def _clear_given_ids(model: nn.Module) -> None:
    for layer in model._miss_layers_given_ids:
        layer.adapter_ids = None
    model._miss_layers_given_ids = []
