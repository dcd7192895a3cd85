"""How the MiSS pass reads one FX node: every form it accepts, checked argument by argument.

A reader returns a node's operands by name, or raises NoMatch naming what it does not accept:
an unknown keyword (alpha=, out=, dtype=, ...), a value other than the default that makes the
node mean something else, or a missing operand. The matchers in passes.py read nodes only through
these, so a form nobody checked is never taken for a plain one, and matching never raises
anything but NoMatch.

Also here: which casts keep every value (`lossless`), and which nodes may write to memory
(`may_mutate`), so the pass never moves a read across a write.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = [
    "NoMatch", "attribute", "bind", "val", "same", "same_shape", "is_call", "describe", "linear_operands", "add_operands",
    "matmul_operands", "chunk_sum_operands", "reshape_source", "permute_dims", "repeat_operands",
    "pad_operands", "dropout_operands", "cast_source", "lossless", "may_mutate", "is_param", "single_user",
    "lossless_root", "check_no_writes",
]


class NoMatch(Exception):
    """A check failed; the message says which."""


_MISSING = object()


def val(node: object) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("val", node.meta.get("example_value"))
    return value if isinstance(value, torch.Tensor) else None


def same(a: object, b: object) -> bool:
    return statically_known_true(a == b)


def same_shape(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))


def is_call(node: object, targets: tuple, method: str | None = None) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target in targets:
        return True
    return method is not None and node.op == "call_method" and node.target == method


def attribute(owner: object, path: str) -> object:
    """What a get_attr node's dotted target names on `owner` (a GraphModule); None when absent."""
    for name in path.split("."):
        owner = getattr(owner, name, None)
    return owner


def describe(node: object) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op in ("placeholder", "get_attr"):
        return node.name
    return f"{getattr(node.target, '__name__', node.target)}(...)"


def bind(node: fx.Node, params: Sequence[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """The node's operands by parameter name (a method's self is the first parameter)."""
    if len(node.args) > len(params):
        raise NoMatch(f"{describe(node)} has {len(node.args)} positional arguments")
    bound = dict(zip(params, node.args, strict=False))  # fewer args than params: defaults follow
    for name, value in node.kwargs.items():
        if name not in params or name in bound:
            raise NoMatch(f"{describe(node)} has the keyword argument {name}=")
        bound[name] = value
    for name in params:
        if name not in bound:
            if name not in defaults:
                raise NoMatch(f"{describe(node)} misses its argument {name}")
            bound[name] = defaults[name]
    return bound


def _is_one(value: object) -> bool:
    return type(value) in (int, float) and value == 1


def _require(condition: bool, why: str) -> None:
    if not condition:
        raise NoMatch(why)


# --- arithmetic

_LINEARS = (F.linear, torch._C._nn.linear)


def linear_operands(node: fx.Node) -> tuple[object, object, object]:
    """F.linear(input, weight, bias=None) -> (x, W, b)."""
    bound = bind(node, ("input", "weight", "bias"), {"bias": None})
    return bound["input"], bound["weight"], bound["bias"]


def add_operands(node: object) -> tuple[object, object]:
    """a + b, torch.add(a, b) and a.add(b), with alpha 1 and no out=; anything else is NoMatch."""
    if is_call(node, (operator.add,)):
        bound = bind(node, ("a", "b"), {})
        return bound["a"], bound["b"]
    if is_call(node, (torch.add,)):
        bound = bind(node, ("input", "other", "alpha", "out"), {"alpha": 1, "out": None})
    elif is_call(node, (), "add"):
        bound = bind(node, ("input", "other", "alpha"), {"alpha": 1})
    else:
        raise NoMatch(f"{describe(node)} is not an add")
    _require(_is_one(bound["alpha"]), f"the add scales its second term (alpha={bound['alpha']!r})")
    _require(bound.get("out") is None, "the add writes into out=")
    return bound["input"], bound["other"]


def matmul_operands(node: object) -> tuple[object, object]:
    if is_call(node, (operator.matmul,)):
        bound = bind(node, ("a", "b"), {})
        return bound["a"], bound["b"]
    if is_call(node, (torch.matmul,)):
        bound = bind(node, ("input", "other", "out"), {"out": None})
    elif is_call(node, (), "matmul"):
        bound = bind(node, ("input", "other"), {})
    else:
        raise NoMatch(f"{describe(node)} is not a matmul")
    _require(bound.get("out") is None, "the matmul writes into out=")
    return bound["input"], bound["other"]


def chunk_sum_operands(node: object) -> tuple[object, int]:
    """sum(t, dim) with one dim, no keepdim, no dtype= and no out= -> (t, dim)."""
    if is_call(node, (torch.sum,)):
        bound = bind(node, ("input", "dim", "keepdim", "dtype", "out"), {"keepdim": False, "dtype": None, "out": None})
    elif is_call(node, (), "sum"):
        bound = bind(node, ("input", "dim", "keepdim", "dtype"), {"keepdim": False, "dtype": None})
    else:
        raise NoMatch(f"{describe(node)} is not a sum")
    dim = bound["dim"]
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    _require(type(dim) is int, f"the sum is over {bound['dim']!r}, not one dim")
    _require(bound["keepdim"] is False, "the sum keeps dims")
    _require(bound["dtype"] is None, f"the sum changes dtype (dtype={bound['dtype']})")
    _require(bound.get("out") is None, "the sum writes into out=")
    return bound["input"], dim


def _sizes(node: fx.Node, name: str) -> tuple:
    """The sizes of a varargs method (x.reshape(2, 3), x.reshape((2, 3)), x.reshape(shape=...))."""
    if node.kwargs:
        _require(len(node.args) == 1 and set(node.kwargs) == {name}, f"{describe(node)} has keyword arguments")
        sizes = node.kwargs[name]
    elif len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        sizes = node.args[1]
    else:
        sizes = node.args[1:]
    return _check_sizes(node, sizes)


def _check_sizes(node: fx.Node, sizes: object) -> tuple:
    _require(isinstance(sizes, (list, tuple)), f"{describe(node)} takes no size list")
    for size in sizes:  # ints or symbolic sizes, never a dtype (x.view(torch.int32) reinterprets bits)
        _require(type(size) is int or isinstance(size, (fx.Node, torch.SymInt)), f"{describe(node)} takes {size!r}")
    return tuple(sizes)


def reshape_source(node: object) -> object:
    """torch.reshape(t, shape), t.reshape(...) or t.view(sizes) -> t (the shape is read from meta)."""
    if is_call(node, (torch.reshape,)):
        bound = bind(node, ("input", "shape"), {})
        _check_sizes(node, bound["shape"])
        return bound["input"]
    if is_call(node, (), "reshape"):
        _sizes(node, "shape")
        return node.args[0]
    if is_call(node, (), "view"):
        _sizes(node, "size")
        return node.args[0]
    raise NoMatch(f"{describe(node)} is not a reshape")


def permute_dims(node: object) -> tuple[object, tuple]:
    if is_call(node, (torch.permute,)):
        bound = bind(node, ("input", "dims"), {})
        return bound["input"], _check_sizes(node, bound["dims"])
    if is_call(node, (), "permute"):
        return node.args[0], _sizes(node, "dims")
    raise NoMatch(f"{describe(node)} is not a permute")


def repeat_operands(node: object) -> tuple[object, tuple]:
    if not is_call(node, (), "repeat"):
        raise NoMatch(f"{describe(node)} is not a repeat")
    return node.args[0], _sizes(node, "repeats")


# --- the adapter input's chain: pad, dropout, casts


def pad_operands(node: fx.Node) -> tuple[object, tuple]:
    """F.pad(t, pad, mode="constant", value=None) -> (t, pad)."""
    bound = bind(node, ("input", "pad", "mode", "value"), {"mode": "constant", "value": None})
    _require(bound["mode"] == "constant", f"the pad is {bound['mode']!r}, not zeros")
    _require(bound["value"] in (None, 0, 0.0) and not isinstance(bound["value"], bool), "the pad value is not 0")
    pad = bound["pad"]
    _require(isinstance(pad, (list, tuple)) and all(type(p) is int for p in pad), f"the pad {pad!r} is not constant")
    return bound["input"], tuple(pad)


def dropout_operands(node: fx.Node) -> tuple[object, object, object]:
    """F.dropout(t, p=0.5, training=True, inplace=False) -> (t, p, training)."""
    bound = bind(node, ("input", "p", "training", "inplace"), {"p": 0.5, "training": True, "inplace": False})
    _require(bound["inplace"] is False, "the dropout is in place")
    return bound["input"], bound["p"], bound["training"]


_WIDER = {
    torch.float16: (torch.float32, torch.float64),
    torch.bfloat16: (torch.float32, torch.float64),
    torch.float32: (torch.float64,),
}
_CAST_METHODS = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16}
_FORMATS = (None, torch.preserve_format, torch.contiguous_format)


def lossless(source: torch.dtype, target: torch.dtype) -> bool:
    """Every value of `source` is exactly a value of `target`."""
    return source == target or target in _WIDER.get(source, ())


def cast_source(node: object) -> object:
    """The tensor a value-keeping node reads: a dtype cast (.to(dtype), .float(), ...), .contiguous(),
    .clone(), .detach() or `.data`; NoMatch for any other node or form (to(device), non_blocking=True,
    ...). Whether the cast loses precision is the caller's question (see `lossless`)."""
    if not isinstance(node, fx.Node):
        raise NoMatch(f"{describe(node)} is not a tensor")
    if node.op == "call_function" and getattr(node.target, "__name__", "") == "_get_data_attr":
        return bind(node, ("input",), {})["input"]
    if node.op != "call_method":
        raise NoMatch(f"{describe(node)} is not a cast")
    source = node.args[0] if node.args else None
    if node.target == "to":
        bound = bind(node, ("input", "dtype", "non_blocking", "copy", "memory_format"),
                      {"non_blocking": False, "copy": False, "memory_format": None})
        _require(isinstance(bound["dtype"], torch.dtype), f"{node.name} casts to {bound['dtype']!r}, not a dtype")
        _require(bound["non_blocking"] is False and type(bound["copy"]) is bool, f"{node.name} has copy/non_blocking options")
        _require(bound["memory_format"] in _FORMATS, f"{node.name} changes the memory format")
    elif node.target in (*_CAST_METHODS, "contiguous", "clone"):
        bound = bind(node, ("input", "memory_format"), {"memory_format": None})
        _require(bound["memory_format"] in _FORMATS, f"{node.name} changes the memory format")
    elif node.target == "detach":
        bind(node, ("input",), {})
    else:
        raise NoMatch(f"{describe(node)} is not a cast")
    before, after = val(source), val(node)
    _require(before is not None and after is not None, f"{node.name} has no example value")
    _require(before.device == after.device and same_shape(tuple(before.shape), tuple(after.shape)),
             f"{node.name} moves or reshapes its input")
    return source


# --- what a matched region may read and share


def is_param(node: object) -> bool:
    """A graph input or attribute (parameters arrive so in Dynamo graphs and in the bodies of
    higher-order ops), not computed in the graph."""
    return isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr") and val(node) is not None


def single_user(node: fx.Node) -> fx.Node:
    users = list(node.users)
    if len(users) != 1:
        raise NoMatch(f"{node.name} is used {len(users)} times; the adapter branch must be private")
    return users[0]


def lossless_root(node: object, through_detach: bool) -> tuple[object, list[fx.Node]]:
    """Back through casts that keep every value (and clones); detaches only if asked."""
    nodes = []
    while isinstance(node, fx.Node):
        detaches = node.target in ("detach",) or getattr(node.target, "__name__", "") == "_get_data_attr"
        try:
            source = cast_source(node)
        except NoMatch:
            break
        if (detaches and not through_detach) or not lossless(val(source).dtype, val(node).dtype):
            break
        nodes.append(node)
        node = source
    return node, nodes


def check_no_writes(region: list[fx.Node], anchor: fx.Node) -> None:
    """Nothing from the region's first node to the op's place may write: the op reads x, W, b and
    the blocks there, where the original branch read them earlier."""
    order = {node: index for index, node in enumerate(anchor.graph.nodes)}
    members = set(region)
    first = min(members, key=order.__getitem__)
    node = first
    while node is not anchor:
        if node not in members and may_mutate(node):
            raise NoMatch(f"{describe(node)} may write to memory between {first.name} and {anchor.name}, "
                          "inside the adapter branch")
        node = node.next


# --- writes


_OPERATOR_WRITES = {operator.setitem, operator.delitem} | {
    getattr(operator, f"i{name}") for name in ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod",
                                               "pow", "lshift", "rshift", "and", "or", "xor", "concat")
}
_PURE_DUNDERS = {
    "__getitem__", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__matmul__",
    "__rmatmul__", "__truediv__", "__rtruediv__", "__floordiv__", "__neg__", "__pos__", "__pow__",
    "__rpow__", "__abs__", "__invert__", "__and__", "__or__", "__xor__", "__eq__", "__ne__", "__lt__",
    "__le__", "__gt__", "__ge__", "__mod__", "__len__",
}


def may_mutate(node: fx.Node) -> bool:
    """Whether the node may write to a tensor or change global state (grad mode, autocast).
    Unknown means yes: in-place methods (`add_`, `copy_`), setitem, out=, inplace=True, module and
    higher-order calls, state switches like torch._C._set_grad_enabled."""
    if node.op in ("placeholder", "get_attr", "output"):
        return False
    if node.op == "call_module":
        return True
    if node.kwargs.get("out") is not None or node.kwargs.get("inplace") not in (None, False):
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if not isinstance(name, str):
        return True
    if name.startswith("__") and name.endswith("__"):
        return name not in _PURE_DUNDERS
    if node.op == "call_function" and getattr(operator, name, None) is node.target:
        return node.target in _OPERATOR_WRITES  # operator.and_ is a & b, operator.iand is a &= b
    if name.endswith("_"):
        return True
    if node.op == "call_method":
        return name in ("set", "resize", "requires_grad")
    target = node.target
    if isinstance(target, torch._ops.HigherOrderOperator):
        return True
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    if name.startswith(("_set", "set_", "_enter", "_exit")) or name in ("manual_seed",):
        return True
    return _python_inplace_argument(node)


def _python_inplace_argument(node: fx.Node) -> bool:
    """F.relu(x, True) and friends: an `inplace` parameter given positionally."""
    try:
        signature = inspect.signature(node.target)
    except (TypeError, ValueError):
        return False  # a builtin: its in-place forms end with `_` or take out=
    if "inplace" not in signature.parameters:
        return False
    try:
        bound = signature.bind(*node.args, **node.kwargs)
    except TypeError:
        return True
    return bound.arguments.get("inplace", False) is not False
