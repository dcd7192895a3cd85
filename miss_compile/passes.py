"""The FX pass: find every Linear carrying a MiSS adapter in a Dynamo graph and make it one op.

Matched by data flow and shapes, never by parameter names:
  balance/mini (PEFT):  y = linear(x, W, b) + sum(reshape(chain(x), [..., n, r]), -2) @ D [+ ...]
                        chain = pad / cast / dropout of the Linear's own input; D [r, out] or
                        D.repeat(1, out // mini_r); result cast back to x's dtype.
                        -> miss.linear(x, [chain(x), ...], W, b, [D, ...])
  bat (PEFT):           linear(x, W + delta(W, D) [+ ...], b) with delta the blockwise
                        reshape / permute / W_pq @ D_p + D_p        -> miss.bat_linear(x, W, b, [D, ...])
  our layers already call miss ops; they are counted, not rewritten (merge=True folds them into W,
  except miss.stacked_linear: one block per batch row has no single merged weight).
Anything that looks like an adapter branch but fails a check is left untouched and reported.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import ops, reference  # noqa: F401  (ops registers torch.ops.miss)

__all__ = ["LayerRewrite", "PassReport", "rewrite_miss_linears"]

MISS_OPS = (torch.ops.miss.linear.default, torch.ops.miss.bat_linear.default, torch.ops.miss.stacked_linear.default)
_LINEAR = (F.linear, torch._C._nn.linear)
_MATMUL = (operator.matmul, torch.matmul)
_ADD = (operator.add, torch.add)


@dataclass
class LayerRewrite:
    layer: str
    variant: str  # "balance/mini", "bat", "stacked"
    adapters: int
    source: str  # "peft pattern" or "miss op"
    merged: bool = False


@dataclass
class PassReport:
    rewritten: list[LayerRewrite] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (layer, why)

    def __str__(self) -> str:
        lines = [f"miss_backend: {len(self.rewritten)} MiSS Linear(s) as miss ops, {len(self.skipped)} left as they were"]
        for item in self.rewritten:
            how = "folded into W" if item.merged else item.source
            lines.append(f"  rewritten  {item.layer}: {item.variant}, {item.adapters} adapter(s), {how}")
        for layer, why in self.skipped:
            lines.append(f"  untouched  {layer}: {why}")
        return "\n".join(lines)


class _NoMatch(Exception):
    """A check failed; the message says which."""


# --- node helpers


def _val(node: object) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("val", node.meta.get("example_value"))
    return value if isinstance(value, torch.Tensor) else None


def _same(a: object, b: object) -> bool:
    return statically_known_true(a == b)


def _same_shape(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))


def _is_param(node: object) -> bool:
    """A graph input or attribute (parameters arrive so in Dynamo graphs), not computed in the graph."""
    return isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr") and _val(node) is not None


def _is_call(node: object, targets: tuple, method: str | None = None) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target in targets:
        return True
    return method is not None and node.op == "call_method" and node.target == method


def _arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def layer_name(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    path = re.sub(r"\.__dict__\['_modules'\]\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return path.removesuffix(".base_layer")


def _linear_args(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    return _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")


def _single_user(node: fx.Node) -> fx.Node:
    users = list(node.users)
    if len(users) != 1:
        raise _NoMatch(f"{node.name} is used {len(users)} times; the adapter branch must be private")
    return users[0]


def _strip_casts(node: object) -> object:
    """Through dtype casts, clones, detaches and `.data` (PEFT's bat reads W.data.clone())."""
    while isinstance(node, fx.Node):
        if node.op == "call_method" and node.target in ("to", "clone", "detach", "float", "contiguous") and _cast_only(node):
            node = node.args[0]
        elif node.op == "call_function" and getattr(node.target, "__name__", "") == "_get_data_attr":
            node = node.args[0]
        else:
            break
    return node


def _strip_dtype_casts(node: object) -> object:
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("to", "float") and _cast_only(node):
        node = node.args[0]
    return node


def _cast_only(node: fx.Node) -> bool:
    if node.target != "to":
        return True
    extra = list(node.args[1:]) + [v for k, v in node.kwargs.items() if k != "copy"]
    return len(extra) == 1 and isinstance(extra[0], torch.dtype)


# --- balance / mini


def _adapter_input_root(node: fx.Node, x: fx.Node) -> None:
    """The adapter input must be x through zero-pads on the last dim, casts and dropout only."""
    current = node
    while current is not x:
        if _is_call(current, (F.pad, torch._C._nn.pad)):
            pad, mode, value = current.args[1], _arg(current, 2, "mode", "constant"), _arg(current, 3, "value", None)
            if len(pad) != 2 or pad[0] != 0 or mode != "constant" or value not in (None, 0, 0.0):
                raise _NoMatch(f"{current.name} pads other than zeros at the end of the last dim")
        elif _is_call(current, (F.dropout,)):
            if _arg(current, 3, "inplace", False):
                raise _NoMatch("in-place dropout on the adapter input")
        elif not (current.op == "call_method" and current.target in ("to", "float", "contiguous") and _cast_only(current)):
            what = current.name if current.op == "placeholder" else f"{getattr(current.target, '__name__', current.target)}(...)"
            raise _NoMatch(f"the adapter branch reads {what}, not the Linear's input")
        current = current.args[0] if current.args else current.kwargs.get("input")
        if not isinstance(current, fx.Node):
            raise _NoMatch("the adapter branch does not start at a tensor")


def _match_chunk_term(term: fx.Node, x: fx.Node, out_features: int) -> tuple[fx.Node, fx.Node]:
    """term = S(a) @ D for a MiSS block D; returns (a, D)."""
    if not _is_call(term, _MATMUL):
        raise _NoMatch("the added term is not a matmul")
    chunk_sum, block = term.args
    mini_of = None
    if _is_call(block, (), "repeat") and _is_param(block.args[0]):
        base = _val(block.args[0])
        repeats = tuple(block.args[1:]) if len(block.args) > 2 else tuple(block.args[1])
        if not (base.dim() == 2 and len(repeats) == 2 and repeats[0] == 1 and _same(base.shape[1] * repeats[1], out_features)):
            raise _NoMatch("the block is repeated other than along out_features")
        mini_of, block = block, block.args[0]
    if not _is_param(block):
        raise _NoMatch("the right-hand side is not a parameter")
    block_val = _val(block)
    if block_val.dim() != 2 or not (mini_of is not None or _same(block_val.shape[1], out_features)):
        raise _NoMatch(f"block {tuple(block_val.shape)} is not [r, out={out_features}]")
    r = block_val.shape[0]
    if not _is_call(chunk_sum, (torch.sum,), "sum"):
        raise _NoMatch("the left-hand side is not a sum")
    reshaped = chunk_sum.args[0]
    dim = _arg(chunk_sum, 1, "dim")
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    if _arg(chunk_sum, 2, "keepdim", False) or chunk_sum.kwargs.get("dtype") is not None:
        raise _NoMatch("the sum keeps dims or changes dtype")
    if not _is_call(reshaped, (torch.reshape,), "reshape") and not _is_call(reshaped, (), "view"):
        raise _NoMatch("the sum does not reduce a reshape")
    adapter_input = reshaped.args[0]
    a_val, reshaped_val = _val(adapter_input), _val(reshaped)
    if a_val is None or reshaped_val is None or dim not in (-2, reshaped_val.dim() - 2):
        raise _NoMatch("the sum is not over the chunk dim (-2)")
    width = a_val.shape[-1]
    if not _same_shape(tuple(reshaped_val.shape), (*a_val.shape[:-1], width // r, r)) or not _same(width % r, 0):
        raise _NoMatch(f"the reshape {tuple(reshaped_val.shape)} is not [..., in/r, r={r}]")
    if a_val.dtype != block_val.dtype:
        raise _NoMatch(f"adapter input is {a_val.dtype}, block {block_val.dtype}")
    for node in (term, chunk_sum, reshaped) + ((mini_of,) if mini_of is not None else ()):
        _single_user(node)
    _adapter_input_root(adapter_input, x)
    return adapter_input, block


def _match_chunk_linear(linear: fx.Node) -> tuple[list[fx.Node], list[fx.Node], fx.Node]:
    x, weight, _ = _linear_args(linear)
    out_features = _val(weight).shape[0]
    accumulated, adapter_inputs, blocks = linear, [], []
    while True:
        users = list(accumulated.users)
        if len(users) != 1 or not _is_call(users[0], _ADD) or users[0].args[0] is not accumulated:
            break
        try:
            adapter_input, block = _match_chunk_term(users[0].args[1], x, out_features)
        except _NoMatch:
            if not blocks:
                raise
            break
        adapter_inputs.append(adapter_input)
        blocks.append(block)
        accumulated = users[0]
    if not blocks:
        raise _NoMatch("no adapter term")
    return adapter_inputs, blocks, accumulated


def _looks_like_adapter(linear: fx.Node) -> bool:
    users = list(linear.users)
    return len(users) == 1 and _is_call(users[0], _ADD) and _is_call(users[0].args[1], _MATMUL)


# --- bat


def _match_bat_delta(delta: fx.Node, current: fx.Node) -> fx.Node:
    """delta = reshape(permute(W4 @ D + D, 1, 2, 0, 3), out, in), W4 = reshape(W_k).permute(2, 0, 1, 3)."""
    if not _is_call(delta, (torch.reshape,), "reshape"):
        raise _NoMatch("bat delta is not a reshape")
    back = delta.args[0]
    if not (_is_call(back, (torch.permute,), "permute") and tuple(back.args[1:]) in ((1, 2, 0, 3), ((1, 2, 0, 3),))):
        raise _NoMatch("bat delta is not permuted back (1, 2, 0, 3)")
    summed = back.args[0]
    if not _is_call(summed, _ADD):
        raise _NoMatch("bat delta is not W @ D + D")
    product, block = summed.args
    if not (_is_call(product, _MATMUL) and product.args[1] is block and _is_param(block)):
        raise _NoMatch("bat delta is not W @ D + D with D a parameter")
    blocked = product.args[0]
    if not (_is_call(blocked, (torch.permute,), "permute") and tuple(blocked.args[1:]) in ((2, 0, 1, 3), ((2, 0, 1, 3),))):
        raise _NoMatch("bat weight blocks are not permuted (2, 0, 1, 3)")
    grid = blocked.args[0]
    block_val, weight_val = _val(block), _val(current)
    r = block_val.shape[-1]
    out_features, in_features = weight_val.shape
    expected = (out_features // r, r, in_features // r, r)
    if not (_is_call(grid, (torch.reshape,), "reshape") and _same_shape(tuple(_val(grid).shape), expected)):
        raise _NoMatch("bat weight is not reshaped to [out/r, r, in/r, r]")
    if not _same_shape(tuple(block_val.shape), (out_features // r, r, r)):
        raise _NoMatch(f"bat block {tuple(block_val.shape)} does not tile the weight {tuple(weight_val.shape)}")
    if _strip_casts(grid.args[0]) is not _strip_casts(current):
        raise _NoMatch("bat delta is computed from another weight")
    for node in (delta, back, summed, product, blocked, grid):
        _single_user(node)
    return block


def _match_bat_linear(linear: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    _, weight, _ = _linear_args(linear)
    blocks = []
    current = weight
    while _is_call(current, _ADD) and not _is_param(current):
        previous, delta = current.args
        blocks.insert(0, _match_bat_delta(delta, previous))
        _single_user(current)
        current = previous
    base = _strip_casts(current)
    if not blocks or not _is_param(base):
        raise _NoMatch("the weight is not a parameter folded with bat blocks")
    if _val(base).requires_grad and current is not base:
        raise _NoMatch("the base weight trains but PEFT's bat detaches it; left as PEFT computes it")
    return base, blocks


# --- the pass


def _replace(graph: fx.Graph, anchor: fx.Node, x: fx.Node, target: object, args: tuple,
             last: fx.Node | None = None) -> fx.Node:
    """Insert target(*args) after `anchor`; route the users of `last` (default: anchor), or of
    its cast back to x's dtype, to it."""
    last = anchor if last is None else last
    x_dtype = _val(x).dtype
    if _val(last).dtype != x_dtype:
        users = list(last.users)
        cast = users[0] if len(users) == 1 else None
        if cast is None or not (cast.op == "call_method" and cast.target == "to" and _cast_only(cast)
                                and _val(cast).dtype == x_dtype):
            raise _NoMatch(f"the result ({_val(last).dtype}) is not cast back to the input's dtype {x_dtype}")
        last = cast
    with graph.inserting_after(anchor):  # anchor follows every arg; last's users follow anchor
        op_node = graph.call_function(target, args)
    op_node.meta.update({k: v for k, v in last.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
    op_node.meta["example_value"] = _val(last)
    last.replace_all_uses_with(op_node)
    return op_node


def _mergeable(blocks: list[fx.Node], adapter_inputs: list[fx.Node], x: fx.Node) -> bool:
    """Frozen blocks and no dropout that is live (training) on the adapter path."""
    if any(_val(block).requires_grad for block in blocks):
        return False
    for adapter_input in adapter_inputs:
        try:
            _adapter_input_root(adapter_input, x)
        except _NoMatch:
            return False
        current = adapter_input
        while current is not x:
            if _is_call(current, (F.dropout,)) and _arg(current, 2, "training", True) is not False:
                return False
            current = current.args[0]
    return True


def _merged_linear(graph: fx.Graph, last: fx.Node, x: fx.Node, weight: fx.Node, bias: fx.Node | None,
                   blocks: list[fx.Node], variants: list[str]) -> None:
    with graph.inserting_after(last):
        folded = graph.call_function(reference.fold_weight, (weight, blocks, variants))
    _replace(graph, folded, x, F.linear, (x, folded, bias), last=last)


def _fold_if_asked(graph: fx.Graph, node: fx.Node, merge: bool) -> LayerRewrite:
    """A miss op already in the graph (our layers): counted, and folded into W when merging."""
    if node.target is torch.ops.miss.stacked_linear.default:
        n_blocks = _val(node.args[4]).shape[0]
        return LayerRewrite(layer_name(node), "stacked", n_blocks, "miss op")
    if node.target is torch.ops.miss.bat_linear.default:
        x, weight, bias, blocks = node.args
        adapter_inputs, variants, kind = [], ["bat"] * len(blocks), "bat"
    else:
        x, adapter_inputs, weight, bias, blocks = node.args
        variants = ["balance" if _same(_val(b).shape[1], _val(weight).shape[0]) else "mini" for b in blocks]
        kind = "balance/mini"
    merged = merge and (_is_param(weight) or _is_transposed_param(weight)) and _mergeable(blocks, adapter_inputs, x)
    if merged:
        _merged_linear(graph, node, x, weight, bias, blocks, variants)
    return LayerRewrite(layer_name(node), kind, len(blocks), "miss op", merged)


def _is_transposed_param(node: object) -> bool:
    """GPT-2's Conv1D weight reaches our op as weight.t()."""
    return _is_call(node, (torch.t,), "t") and _is_param(node.args[0])


def rewrite_miss_linears(graph: fx.Graph, merge: bool = False) -> PassReport:
    """Rewrite in place; returns what was rewritten and what was left, with reasons.

    merge=True: Linears whose blocks are all frozen (and whose dropout is off) become
    linear(x, fold_weight(W, blocks), b); under Inductor's freezing the fold runs once.
    """
    report = PassReport()
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in MISS_OPS:
            report.rewritten.append(_fold_if_asked(graph, node, merge))
            continue
        if not _is_call(node, _LINEAR):
            continue
        x, weight, bias = _linear_args(node)
        if _val(x) is None or _val(weight) is None:
            continue
        try:
            if _is_param(weight):
                adapter_inputs, blocks, last = _match_chunk_linear(node)
                merged = merge and _mergeable(blocks, adapter_inputs, x)
                if merged:
                    variants = ["balance" if _same(_val(b).shape[1], _val(weight).shape[0]) else "mini" for b in blocks]
                    _merged_linear(graph, last, x, weight, bias, blocks, variants)
                else:
                    _replace(graph, last, x, torch.ops.miss.linear.default, (x, adapter_inputs, weight, bias, blocks))
                report.rewritten.append(LayerRewrite(layer_name(node), "balance/mini", len(blocks), "peft pattern", merged))
            else:
                base_weight, blocks = _match_bat_linear(node)
                x_root, bias_root = _strip_dtype_casts(x), _strip_dtype_casts(bias)
                merged = merge and _mergeable(blocks, [], x_root)
                if merged:
                    _merged_linear(graph, node, x_root, base_weight, bias_root, blocks, ["bat"] * len(blocks))
                else:
                    _replace(graph, node, x_root, torch.ops.miss.bat_linear.default,
                             (x_root, base_weight, bias_root, blocks))
                report.rewritten.append(LayerRewrite(layer_name(node), "bat", len(blocks), "peft pattern", merged))
        except _NoMatch as reason:
            if not _is_param(weight) or _looks_like_adapter(node):
                report.skipped.append((layer_name(node), str(reason)))
    graph.eliminate_dead_code()
    graph.lint()
    return report
