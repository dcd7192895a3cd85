"""The FX pass: find every Linear carrying a MiSS adapter in a Dynamo graph and make it one op.

Matched by data flow and shapes, never by parameter names:
  balance/mini (PEFT):  y = linear(x, W, b) + sum(reshape(chain(x), [..., n, r]), -2) @ D [+ ...]
                        chain = zero right-pad / float cast / dropout of the Linear's own input; D [r, out]
                        or D.repeat(1, out // mini_r); result cast back to x's dtype.
                        -> miss.linear(x, [chain(x), ...], W, b, [D, ...])
  bat (PEFT):           linear(x, W + delta(W, D) [+ ...], b) with delta the blockwise
                        reshape / permute / W_pq @ D_p + D_p        -> miss.bat_linear(x, W, b, [D, ...])
  our layers already call miss ops; they are counted, not rewritten (merge=True folds them into W,
  except miss.stacked_linear: one block per batch row has no single merged weight).
Every node is read through pass_forms, which accepts only forms it checks completely (keywords
included). A match is refused when anything between its first node and the op's place may write
to memory, so the op reads what the branch read. Bodies of higher-order ops (activation
checkpointing) are rewritten too. Anything that looks like an adapter branch but fails a check is
left untouched and reported; the graph is changed only once a layer has matched completely.
"""

from __future__ import annotations

import logging
import operator
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

from . import ops, reference  # noqa: F401  (ops registers torch.ops.miss)
from .pass_forms import (
    NoMatch,
    add_operands,
    attribute,
    bind,
    cast_source,
    check_no_writes,
    chunk_sum_operands,
    describe,
    dropout_operands,
    is_call,
    is_param,
    linear_operands,
    lossless,
    lossless_root,
    matmul_operands,
    pad_operands,
    permute_dims,
    repeat_operands,
    reshape_source,
    same,
    same_shape,
    single_user,
    val,
)

__all__ = ["LayerRewrite", "PassReport", "rewrite_miss_linears", "layer_name", "MISS_OPS"]

logger = logging.getLogger(__name__)

MISS_OPS = (torch.ops.miss.linear.default, torch.ops.miss.bat_linear.default, torch.ops.miss.stacked_linear.default)
_LINEAR = (F.linear, torch._C._nn.linear)
_ADDS = (torch.add, operator.add)
_MATMULS = (torch.matmul, operator.matmul)
_PADS = (F.pad, torch._C._nn.pad)


@dataclass
class LayerRewrite:
    layer: str
    variant: str  # "balance/mini", "bat", "stacked"
    adapters: int
    source: str  # "peft pattern" or "miss op"
    merged: bool = False
    not_folded: str = ""  # merge=True only: why this layer stays an unmerged miss op


@dataclass
class PassReport:
    rewritten: list[LayerRewrite] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (layer, why)

    def __str__(self) -> str:
        lines = [f"miss_backend: {len(self.rewritten)} MiSS Linear(s) as miss ops, {len(self.skipped)} left as they were"]
        for item in self.rewritten:
            how = "folded into W" if item.merged else item.source
            why = f" (not folded: {item.not_folded})" if item.not_folded else ""
            lines.append(f"  rewritten  {item.layer}: {item.variant}, {item.adapters} adapter(s), {how}{why}")
        for layer, why in self.skipped:
            lines.append(f"  untouched  {layer}: {why}")
        return "\n".join(lines)


@dataclass
class _Match:
    """A layer that matched completely: what the op takes, where it goes, whose users it takes over."""

    kind: str  # "balance/mini" or "bat"
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    blocks: list[fx.Node]
    adapter_inputs: list[fx.Node]  # balance/mini only
    anchor: fx.Node  # the op is inserted right after it
    result: fx.Node  # its users read the op instead
    not_folded: str | None  # why merging would not be exact; None when it would be
    region: list[fx.Node]  # the matched nodes, erased once nothing reads them


# --- node helpers


def layer_name(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    path = re.sub(r"\.__dict__\['_modules'\]\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"^L\[(?:'self'|'args'\]\[0)\]\.?", "", path)  # a model traced under freezing is args[0]
    return path.removesuffix(".base_layer")


def _result(last: fx.Node, x_dtype: torch.dtype) -> fx.Node:
    """The node whose users take the op's output: `last`, or its cast back to x's dtype."""
    if val(last) is None:
        raise NoMatch(f"{last.name} has no example value")
    if val(last).dtype == x_dtype:
        return last
    users = list(last.users)
    if len(users) == 1 and users[0].op == "call_method" and val(users[0]) is not None and val(users[0]).dtype == x_dtype:
        try:
            if cast_source(users[0]) is last:
                return users[0]
        except NoMatch:
            pass
    raise NoMatch(f"the result ({val(last).dtype}) is not cast back to the input's dtype {x_dtype}")


# --- balance / mini


def _adapter_path(adapter_input: object, x: fx.Node) -> tuple[list[fx.Node], str | None]:
    """The nodes from x to the adapter input, and why S(adapter input) would not be S(x) exactly
    (None: it is). NoMatch unless it is x through zero right-pads of the last dim, float casts
    and dropout."""
    nodes, inexact, current = [], None, adapter_input
    while current is not x:
        if not isinstance(current, fx.Node):
            raise NoMatch("the adapter branch does not start at a tensor")
        if is_call(current, _PADS):
            source, pad = pad_operands(current)
            if len(pad) != 2 or pad[0] != 0 or pad[1] < 0:
                raise NoMatch(f"{current.name} pads {pad}: only zeros after the last dim keep the Linear's input")
        elif is_call(current, (F.dropout,)):
            source, p, training = dropout_operands(current)
            if not (training is False or p == 0):
                inexact = inexact or "dropout is live on the adapter input"
        elif current.op == "call_method" and current.target in ("to", "float", "double", "half", "bfloat16",
                                                                 "contiguous", "clone", "detach"):
            source = cast_source(current)
            before, after = val(source).dtype, val(current).dtype
            if not (before.is_floating_point and after.is_floating_point):
                through = after if not after.is_floating_point else before
                raise NoMatch(f"the adapter input casts the Linear's input through {through}")
            if not lossless(before, after):
                inexact = inexact or f"the adapter input rounds x ({before}) to {after}"
            if current.target == "detach":
                inexact = inexact or "the adapter input is detached from x"
        else:
            raise NoMatch(f"the adapter branch reads {describe(current)}, not the Linear's input")
        nodes.append(current)
        current = source
    return nodes, inexact


def _match_chunk_term(term: fx.Node, x: fx.Node, out_features: int) -> tuple[fx.Node, fx.Node, list[fx.Node], str | None]:
    """term = S(a) @ D for a MiSS block D; returns (a, D, the term's nodes, why folding is inexact)."""
    chunk_sum, block = matmul_operands(term)
    nodes = [term]
    if is_call(block, (), "repeat") and is_param(block.args[0]):
        base, repeats = repeat_operands(block)
        base_val = val(base)
        if not (base_val.dim() == 2 and len(repeats) == 2 and repeats[0] == 1
                and type(repeats[1]) is int and same(base_val.shape[1] * repeats[1], out_features)):
            raise NoMatch("the block is repeated other than along out_features")
        nodes.append(block)
        block = base
    elif not _is_balance_block(block, out_features):
        raise NoMatch(f"block {describe(block)} is not [r, out={out_features}]")
    if not is_param(block):
        raise NoMatch("the right-hand side is not a parameter")
    block_val = val(block)
    if block_val.dim() != 2:
        raise NoMatch(f"block {tuple(block_val.shape)} is not [r, out={out_features}]")
    r = block_val.shape[0]
    reshaped, dim = chunk_sum_operands(chunk_sum)
    adapter_input = reshape_source(reshaped)
    a_val, reshaped_val, sum_val = val(adapter_input), val(reshaped), val(chunk_sum)
    if a_val is None or reshaped_val is None or sum_val is None or dim not in (-2, reshaped_val.dim() - 2):
        raise NoMatch("the sum is not over the chunk dim (-2)")
    width = a_val.shape[-1]
    if not _same_shape_of(reshaped_val, (*a_val.shape[:-1], width // r, r)) or not same(width % r, 0):
        raise NoMatch(f"the reshape {tuple(reshaped_val.shape)} is not [..., in/r, r={r}]")
    if not (a_val.dtype == reshaped_val.dtype == sum_val.dtype == block_val.dtype):
        raise NoMatch(f"adapter input is {a_val.dtype}, block {block_val.dtype}")
    nodes += [chunk_sum, reshaped]
    for node in nodes:
        single_user(node)
    path, inexact = _adapter_path(adapter_input, x)
    return adapter_input, block, nodes + path, inexact


def _is_balance_block(block: object, out_features: int) -> bool:
    block_val = val(block)
    return (block_val is not None and block_val.dim() == 2
            and reference.block_variant(block_val.shape, out_features) == "balance")


def _same_shape_of(value: torch.Tensor, shape: tuple) -> bool:
    return same_shape(tuple(value.shape), shape)


def _match_chunk_linear(linear: fx.Node) -> _Match:
    x, weight, bias = linear_operands(linear)
    out_features = val(weight).shape[0]
    accumulated, adapter_inputs, blocks, region, inexact = linear, [], [], [linear], None
    while True:
        users = list(accumulated.users)
        if len(users) != 1 or not is_call(users[0], _ADDS, "add"):
            break
        try:
            left, term = add_operands(users[0])
            if left is not accumulated:
                raise NoMatch("the Linear's output is not the first term of the add")
            adapter_input, block, nodes, term_inexact = _match_chunk_term(term, x, out_features)
        except NoMatch:
            if not blocks:
                raise
            break  # the adapters matched so far become the op; this add stays, reading its output
        adapter_inputs.append(adapter_input)
        blocks.append(block)
        region += [users[0], *nodes]
        inexact = inexact or term_inexact
        accumulated = users[0]
    if not blocks:
        raise NoMatch("no adapter term")
    result = _result(accumulated, val(x).dtype)
    region.append(result)
    check_no_writes(region, accumulated)
    return _Match("balance/mini", x, weight, bias, blocks, adapter_inputs, accumulated, result, inexact, region)


def _looks_like_adapter(linear: fx.Node) -> bool:
    users = list(linear.users)
    if len(users) != 1 or not is_call(users[0], _ADDS, "add"):
        return False
    operands = list(users[0].args) + list(users[0].kwargs.values())
    return any(is_call(operand, _MATMULS, "matmul") for operand in operands)


# --- bat


def _match_bat_delta(delta: object, current: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """delta = reshape(permute(W4 @ D + D, 1, 2, 0, 3), out, in), W4 = reshape(W_k).permute(2, 0, 1, 3)."""
    back = reshape_source(delta)
    weight_val, delta_val = val(current), val(delta)
    if weight_val is None or delta_val is None or not _same_shape_of(delta_val, tuple(weight_val.shape)):
        raise NoMatch("bat delta is not shaped as the weight")
    summed, dims = permute_dims(back)
    if dims != (1, 2, 0, 3):
        raise NoMatch("bat delta is not permuted back (1, 2, 0, 3)")
    product, block = add_operands(summed)
    blocked, block_again = matmul_operands(product)
    if block_again is not block or not is_param(block):
        raise NoMatch("bat delta is not W @ D + D with D a parameter")
    grid, dims = permute_dims(blocked)
    if dims != (2, 0, 1, 3):
        raise NoMatch("bat weight blocks are not permuted (2, 0, 1, 3)")
    weight_source = reshape_source(grid)
    block_val = val(block)
    r = block_val.shape[-1] if block_val.dim() == 3 else 0
    out_features, in_features = weight_val.shape
    if not r or not _same_shape_of(block_val, (out_features // r, r, r)):
        raise NoMatch(f"bat block {tuple(block_val.shape)} does not tile the weight {tuple(weight_val.shape)}")
    if val(grid) is None or not _same_shape_of(val(grid), (out_features // r, r, in_features // r, r)):
        raise NoMatch("bat weight is not reshaped to [out/r, r, in/r, r]")
    source_root, source_casts = lossless_root(weight_source, through_detach=True)
    if source_root is not lossless_root(current, through_detach=True)[0]:
        raise NoMatch("bat delta is computed from another weight (or one rounded on the way)")
    nodes = [delta, back, summed, product, blocked, grid]
    for node in nodes:
        single_user(node)
    return block, nodes + source_casts


def _match_bat_linear(linear: fx.Node) -> _Match:
    x, weight, bias = linear_operands(linear)
    blocks, region, current = [], [linear], weight
    while not is_param(current) and is_call(current, _ADDS, "add"):
        previous, delta = add_operands(current)
        block, nodes = _match_bat_delta(delta, previous)
        blocks.insert(0, block)
        # Read by the Linear, or by the next adapter's fold and delta (PEFT's W_k with several adapters).
        if any(user not in region for user in current.users):
            raise NoMatch(f"{current.name} is also used outside the bat fold")
        region += [current, *nodes]
        current = previous
    base, weight_casts = lossless_root(current, through_detach=True)
    if not blocks or not is_param(base):
        raise NoMatch("the weight is not a parameter folded with bat blocks")
    if val(base).requires_grad and current is not base:
        raise NoMatch("the base weight trains but PEFT's bat detaches it; left as PEFT computes it")
    x_root, x_casts = lossless_root(x, through_detach=False)
    bias_root, bias_casts = lossless_root(bias, through_detach=False)
    result = _result(linear, val(x_root).dtype)
    region += [*weight_casts, *x_casts, *bias_casts, result]
    check_no_writes(region, linear)
    not_folded = None
    if val(x_root).dtype != val(base).dtype:
        not_folded = f"x is {val(x_root).dtype}, the weight {val(base).dtype}"
    return _Match("bat", x_root, base, bias_root, blocks, [], linear, result, not_folded, region)


# --- rewriting (only once a match is complete: nothing here raises NoMatch)


def _variants(match: _Match) -> list[str]:
    out_features = val(match.weight).shape[0]
    return [reference.block_variant(val(block).shape, out_features) for block in match.blocks]


def _insert(graph: fx.Graph, anchor: fx.Node, result: fx.Node, target: object, args: tuple) -> fx.Node:
    """target(*args) right after `anchor` (which follows every arg); `result`'s users read it."""
    with graph.inserting_after(anchor):
        op_node = graph.call_method(target, args) if isinstance(target, str) else graph.call_function(target, args)
    op_node.meta.update({k: v for k, v in result.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
    op_node.meta["example_value"] = val(result)
    result.replace_all_uses_with(op_node)
    return op_node


def _apply(graph: fx.Graph, match: _Match, merge: bool) -> bool:
    """Rewrite the matched layer; returns whether its adapters were folded into W."""
    folds = merge and match.not_folded is None
    if folds:
        with graph.inserting_after(match.anchor):
            folded = graph.call_function(reference.fold_weight, (match.weight, match.blocks, _variants(match)))
        with graph.inserting_after(folded):
            linear = graph.call_function(F.linear, (match.x, folded, match.bias))
        # Back to the op's dtype: under autocast F.linear returns bf16 where the op returns x's dtype.
        _insert(graph, linear, match.result, "to", (linear, val(match.result).dtype))
    elif match.kind == "bat":
        _insert(graph, match.anchor, match.result, torch.ops.miss.bat_linear.default,
                (match.x, match.weight, match.bias, match.blocks))
    else:
        _insert(graph, match.anchor, match.result, torch.ops.miss.linear.default,
                (match.x, match.adapter_inputs, match.weight, match.bias, match.blocks))
    _erase_unused(graph, match.region)
    return folds


def _erase_unused(graph: fx.Graph, region: list[fx.Node]) -> None:
    """Erase the matched nodes nothing reads any more. Not a graph-wide dead-code pass: that
    would also drop the user's in-place ops whose results are unused (x.mul_(2))."""
    pending = {node for node in region if node.op == "call_function" or node.op == "call_method"}
    while True:
        dead = [node for node in pending if not node.users]
        if not dead:
            return
        for node in dead:
            graph.erase_node(node)
            pending.discard(node)


def _fold_reason(match: _Match, merge: bool) -> None:
    """Frozen blocks only: folding a trained block would cut its gradient."""
    if merge and match.not_folded is None and any(val(block).requires_grad for block in match.blocks):
        match.not_folded = "its blocks require grad"


def _match_miss_op(node: fx.Node) -> _Match:
    """A miss op already in the graph (our layers): counted, and folded into W when merging."""
    if node.target is torch.ops.miss.bat_linear.default:
        bound = bind(node, ("x", "weight", "bias", "blocks"), {})
        adapter_inputs, inexact = [], None
    else:
        bound = bind(node, ("x", "adapter_inputs", "weight", "bias", "blocks"), {})
        adapter_inputs, inexact = list(bound["adapter_inputs"]), None
        for adapter_input in adapter_inputs:
            try:
                inexact = inexact or _adapter_path(adapter_input, bound["x"])[1]
            except NoMatch as reason:
                inexact = inexact or str(reason)
    weight = bound["weight"]
    if not (is_param(weight) or (is_call(weight, (torch.t,), "t") and is_param(weight.args[0]))):
        inexact = "the weight is computed in the graph"  # GPT-2's Conv1D weight reaches our op as W.t()
    kind = "bat" if node.target is torch.ops.miss.bat_linear.default else "balance/mini"
    return _Match(kind, bound["x"], weight, bound["bias"], list(bound["blocks"]), adapter_inputs, node, node, inexact,
                  [node])


def _plan(node: fx.Node, merge: bool) -> tuple[_Match | None, LayerRewrite | None]:
    """Match one node, reading only: (what to apply, what to report); NoMatch when it is no MiSS."""
    if node.target is torch.ops.miss.stacked_linear.default:
        stack = bind(node, ("x", "adapter_ids", "weight", "bias", "stack"), {})["stack"]
        return None, LayerRewrite(layer_name(node), "stacked", val(stack).shape[0], "miss op")
    if node.target in MISS_OPS:
        match, source = _match_miss_op(node), "miss op"
    else:
        x, weight, _ = linear_operands(node)
        if val(x) is None or val(weight) is None:
            return None, None
        match, source = (_match_chunk_linear(node) if is_param(weight) else _match_bat_linear(node)), "peft pattern"
    _fold_reason(match, merge)
    merged = merge and match.not_folded is None
    not_folded = (match.not_folded or "") if merge and not merged else ""
    if source == "miss op" and not merged:
        return None, LayerRewrite(layer_name(node), match.kind, len(match.blocks), source, False, not_folded)
    return match, LayerRewrite(layer_name(node), match.kind, len(match.blocks), source, merged, not_folded)


def _should_report(node: fx.Node) -> bool:
    try:
        _, weight, _ = linear_operands(node)
    except NoMatch:
        return True
    return not is_param(weight) or _looks_like_adapter(node)


def _rewrite_graph(graph: fx.Graph, merge: bool, report: PassReport, seen: set[int]) -> None:
    for node in list(graph.nodes):
        if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
            _rewrite_bodies(graph, node, merge, report, seen)
            continue
        if not (node.op == "call_function" and (node.target in MISS_OPS or node.target in _LINEAR)):
            continue
        try:
            match, entry = _plan(node, merge)
        except NoMatch as reason:
            if _should_report(node):
                report.skipped.append((layer_name(node), str(reason)))
            continue
        except Exception as error:  # a bug in a matcher; matching only reads, so the graph is as it was
            logger.warning("miss pass: internal matcher error at %s (%s), left as it was", node.name, error,
                           exc_info=True)
            report.skipped.append((layer_name(node), f"internal matcher error: {type(error).__name__}: {error}"))
            continue
        if match is not None:
            _apply(graph, match, merge)
        if entry is not None:
            report.rewritten.append(entry)
    graph.lint()


def _rewrite_bodies(graph: fx.Graph, node: fx.Node, merge: bool, report: PassReport, seen: set[int]) -> None:
    """The bodies of a higher-order op (activation checkpointing's tag_activation_checkpoint, ...)
    are GraphModules read through get_attr: rewrite them as graphs of their own."""
    owner = graph.owning_module
    for arg in node.all_input_nodes:
        if arg.op != "get_attr":
            continue
        body = attribute(owner, arg.target)
        if isinstance(body, torch.Tensor):
            continue  # a parameter or buffer the body reads (freezing makes them attributes): data
        if not isinstance(body, fx.GraphModule):
            report.skipped.append((node.name, f"{node.target.name()} runs {arg.target}, which the pass cannot read"))
            continue
        if id(body) in seen:
            continue
        seen.add(id(body))
        _rewrite_graph(body.graph, merge, report, seen)
        body.recompile()


def rewrite_miss_linears(graph: fx.Graph, merge: bool = False) -> PassReport:
    """Rewrite in place; returns what was rewritten and what was left, with reasons.

    merge=True: Linears whose blocks are all frozen, whose dropout is off and whose adapters read
    x exactly (zero pads and value-keeping casts) become linear(x, fold_weight(W, blocks), b);
    under Inductor's freezing the fold runs once. Others stay miss ops, with the reason.
    """
    report = PassReport()
    _rewrite_graph(graph, merge, report, set())
    return report
