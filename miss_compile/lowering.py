"""How Inductor lowers the MiSS ops: decompositions into ops it fuses well.

miss.linear    when every adapter reads x itself in x's dtype and fold_rule says so (W + dW no
               larger than the output: tokens >= in; fold_rule.py says why): one GEMM on W + dW.
               The op's backward asks the same rule for x's gradient (ops.py), so a training step
               there costs the base GEMMs plus S(x).T @ grad per block.
               Otherwise: the chunk sums (pad, cast and dropout fused into one reduction over x),
               their small GEMMs, and then, when dtypes agree, addmm(bias + adapter, x, W.T): the
               adapter product enters the base GEMM as its input instead of a separate add.
               Mixed dtypes (bf16 model, fp32 adapters) keep PEFT's rounding: base in x's dtype,
               adapter added in fp32, cast back.
mini           S(x) @ D is [tokens, mini_r]; it is tiled to out after the GEMM, not before.
miss.stacked_linear  the chunk sums of every row, the rows' blocks gathered by id from the stack, one
               batched GEMM [batch, tokens, r] x [batch, r, out], then addmm as for miss.linear.
miss.bat_linear the folded weight, then one linear; with freezing and frozen blocks Inductor
               folds it once at compile time.
The backward formulas are the ops' own (ops.py); these only shape the forward. Under torch.autocast
the ops' autocast rule (ops.py) runs before these while AOT traces: they see x, W and the blocks
already in the autocast dtype, and adapter inputs in theirs (S(a) is cast to the block's dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._inductor.decomposition import register_decomposition

from . import fold_rule, ops, reference

__all__ = ["miss_linear_decomposition", "bat_linear_decomposition", "stacked_linear_decomposition"]


def _adapter_product(adapter_input: Tensor, block: Tensor, out_features: int) -> Tensor:
    product = ops.chunk_sum_for(adapter_input, block) @ block  # [..., out] or [..., mini_r]
    if reference.block_variant(block.shape, out_features) == "mini":
        product = product.repeat(*([1] * (product.dim() - 1)), out_features // block.shape[1])
    return product


@register_decomposition(torch.ops.miss.linear.default)
def miss_linear_decomposition(x: Tensor, adapter_inputs: list[Tensor], weight: Tensor, bias: Tensor | None,
                              blocks: list[Tensor]) -> Tensor:
    out_features = weight.shape[0]
    if all(ops.reads_x(x, adapter_inputs, weight, blocks)) and fold_rule.folds_for(x, weight, backward=False):
        folded_t = _folded_weight_t(weight, blocks)
        x_2d = x.reshape(-1, weight.shape[1])
        out = x_2d @ folded_t if bias is None else torch.addmm(bias, x_2d, folded_t)
        return out.reshape(*x.shape[:-1], out_features)
    adapter = None
    for adapter_input, block in zip(adapter_inputs, blocks, strict=True):
        product = _adapter_product(adapter_input, block, out_features)
        adapter = product if adapter is None else adapter + product
    return _linear_plus(x, weight, bias, adapter)


def _folded_weight_t(weight: Tensor, blocks: list[Tensor]) -> Tensor:
    """(W + dW).T, built in [in, out] layout with reference.fold_weight's rounding.

    The op's backward builds W + dW too. Built the same way, AOT's CSE would share one tensor
    between them and the partitioner would keep an [out, in] copy of every adapted weight alive
    until backward; this different expression makes backward rebuild it (one pass over W).
    """
    out_features, in_features = weight.shape
    folded_t = weight.t()
    for block in blocks:
        expanded = reference.expand_block(block, reference.block_variant(block.shape, out_features), out_features)
        delta_t = expanded.repeat(-(-in_features // block.shape[0]), 1)[:in_features]  # row i is D[i % r]
        dtype = reference.accumulate_dtype(weight.dtype, block.dtype)
        folded_t = (folded_t.to(dtype) + delta_t.to(dtype)).to(weight.dtype)
    return folded_t


def _linear_plus(x: Tensor, weight: Tensor, bias: Tensor | None, adapter: Tensor) -> Tensor:
    """x @ W.T + b + adapter, the adapter fed into the base GEMM when dtypes agree."""
    out_features, in_features = weight.shape
    if adapter.dtype != x.dtype or weight.dtype != x.dtype:
        return (F.linear(x, weight, bias) + adapter).to(x.dtype)
    accumulate = adapter if bias is None else adapter + bias
    out = torch.addmm(accumulate.reshape(-1, out_features), x.reshape(-1, in_features), weight.t())
    return out.reshape(*x.shape[:-1], out_features)


@register_decomposition(torch.ops.miss.stacked_linear.default)
def stacked_linear_decomposition(x: Tensor, adapter_ids: Tensor, weight: Tensor, bias: Tensor | None,
                                 stack: Tensor) -> Tensor:
    return _linear_plus(x, weight, bias, ops.stacked_product(x, adapter_ids, stack))


# The op's own forward: with freezing and frozen blocks Inductor folds it once at compile time.
bat_linear_decomposition = register_decomposition(torch.ops.miss.bat_linear.default)(ops.bat_forward)
