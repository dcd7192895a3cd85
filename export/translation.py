"""ONNX translations of the miss ops, standard ops only (opset 18), so any onnxruntime build runs them.

They are traced by onnxscript inside torch.onnx.export (custom_translation_table). Blocks stay
separate values: in the unmerged graph they are overridable initializers, so the update is
computed in the graph (bat included) and a new adapter is a new set of initializer values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import from_torch_dtype, to_torch_dtype
from onnxscript import opset18 as op

import miss_compile.ops  # noqa: F401  (registers torch.ops.miss)
from miss_compile.reference import accumulate_dtype, block_variant, compute_dtype

__all__ = ["TRANSLATIONS", "OPSET", "base_linear", "chunk_sum"]

OPSET = 18

# Values are onnxscript/onnx_ir values while tracing; typed loosely on purpose.
Value = Any


def _ints(values: Sequence[int]) -> Value:
    return op.Constant(value_ints=list(values))


def _cast(value: Value, dtype: ir.DataType) -> Value:
    return value if value.dtype == dtype else op.Cast(value, to=dtype)


def _dtype(policy: Callable[..., torch.dtype], *values: Value) -> ir.DataType:
    """The dtype miss_compile.reference's `policy` (compute_dtype or accumulate_dtype) gives these values."""
    return from_torch_dtype(policy(*[to_torch_dtype(value.dtype) for value in values]))


def chunk_sum(adapter_input: Value, r: int) -> Value:
    """S(a): zero-pad the last dim to a multiple of r, fold it to [..., n, r], sum over n."""
    width = adapter_input.shape[-1]
    if not isinstance(width, int):
        raise NotImplementedError("miss.linear: the feature dim of the adapter input must be static")
    # Reshape's 0 keeps that input dim: no Shape/Slice/Concat per Linear (they cost more than the
    # sum itself in a one-token decode step). The rank is read before Pad, whose output has no shape.
    leading = [0] * (len(adapter_input.shape) - 1)
    pad = (-width) % r
    if pad:
        adapter_input = op.Pad(adapter_input, _ints([0, pad]), None, _ints([-1]))
    folded = op.Reshape(adapter_input, _ints([*leading, (width + pad) // r, r]))
    return op.ReduceSum(folded, _ints([-2]), keepdims=0)


def base_linear(x: Value, weight: Value, bias: Value | None) -> Value:
    """x @ W.T + b, the frozen base Linear."""
    result = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
    return result if bias is None else op.Add(result, bias)


def miss_linear(x: Value, adapter_inputs: Sequence[Value], weight: Value, bias: Value | None,
                blocks: Sequence[Value]) -> Value:
    """y = x @ W.T + b + sum_k S(a_k) @ E(D_k); mini's [.., mini_r] product is tiled to out."""
    out_features = weight.shape[0]
    result = base_linear(x, weight, bias)
    dtype = _dtype(compute_dtype, x, *blocks)
    result = _cast(result, dtype)
    rank = len(x.shape)
    for adapter_input, block in zip(adapter_inputs, blocks, strict=True):
        r, columns = block.shape
        product = op.MatMul(chunk_sum(adapter_input, r), block)
        if block_variant(block.shape, out_features) == "mini":
            # Tile the activation, not the block: the block stays an untouched, overridable input.
            product = op.Tile(product, _ints([1] * (rank - 1) + [out_features // columns]))
        result = op.Add(result, _cast(product, dtype))
    return _cast(result, x.dtype)


def bat_linear(x: Value, weight: Value, bias: Value | None, blocks: Sequence[Value]) -> Value:
    """y = x @ fold(W, D_1..D_n).T + b, W'_pq = W_pq @ D_p + D_p + W_pq, in fp32 or wider."""
    out_features, in_features = weight.shape
    dtype = _dtype(accumulate_dtype, weight, *blocks)
    folded = _cast(weight, dtype)
    for block in blocks:
        r = block.shape[-1]
        grid = op.Reshape(folded, _ints([out_features // r, r, in_features // r, r]))
        w_blocks = op.Transpose(grid, perm=[0, 2, 1, 3])  # [p, q, r, r]
        d = op.Unsqueeze(_cast(block, dtype), _ints([1]))  # [p, 1, r, r]
        delta = op.Add(op.MatMul(w_blocks, d), d)
        folded = op.Add(folded, op.Reshape(op.Transpose(delta, perm=[0, 2, 1, 3]), _ints([out_features, in_features])))
    compute = _dtype(compute_dtype, weight, *blocks)
    result = op.MatMul(_cast(x, compute), op.Transpose(_cast(folded, compute), perm=[1, 0]))
    if bias is not None:
        result = op.Add(result, _cast(bias, compute))
    return _cast(result, x.dtype)


def stacked_linear(x: Value, adapter_ids: Value, weight: Value, bias: Value | None, stack: Value) -> Value:
    """y[b] = x[b] @ W.T + bias + S(x[b]) @ stack[ids[b]]: Gather the rows' blocks, one batched MatMul.
    Only Gather reads the stack's first dim, so a stack with more adapters runs on the same graph."""
    _, r, out_features = stack.shape
    result = base_linear(x, weight, bias)
    dtype = _dtype(compute_dtype, x, stack)
    chunk_sums = chunk_sum(_cast(x, stack.dtype), r)  # [batch, ..., r]
    batch = op.Slice(op.Shape(x), _ints([0]), _ints([1]))
    rows = op.Reshape(chunk_sums, op.Concat(batch, _ints([-1, r]), axis=0))  # [batch, tokens, r]
    product = op.MatMul(rows, op.Gather(stack, adapter_ids, axis=0))  # [batch, tokens, out]
    product = op.Reshape(product, op.Shape(result))
    return _cast(op.Add(_cast(result, dtype), _cast(product, dtype)), x.dtype)


TRANSLATIONS = {
    torch.ops.miss.linear.default: miss_linear,
    torch.ops.miss.bat_linear.default: bat_linear,
    torch.ops.miss.stacked_linear.default: stacked_linear,
}
