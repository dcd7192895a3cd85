"""The MiSS math as plain functions: the oracle every fast path is tested against.

Weights are in Linear layout, `weight: [out, in]`. Blocks:
  balance  [r, out]            dW[o, i] = D[i % r, o]
  mini     [r, mini_r]         dW[o, i] = D[i % r, o % mini_r]
  bat      [out // r, r, r]    W'_pq = W_pq @ D_p + D_p + W_pq   (block p of rows, q of columns)

Several active adapters fold into the weight in order: balance/mini add their update, bat maps the
current weight through its affine block. This is what merging them one by one does, so forward and
merge agree for every mix of variants.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = [
    "MAX_UNMERGE_CONDITION",
    "compute_dtype",
    "accumulate_dtype",
    "block_variant",
    "chunk_sum",
    "expand_block",
    "delta_weight",
    "merged_weight",
    "fold_weight",
    "unmerged_weight",
    "check_bat_unmerge",
    "forward",
    "to_bat_blocks",
    "from_bat_blocks",
]

# Unmerging bat multiplies by inv(I + D_p): rounding errors grow by up to its condition number.
MAX_UNMERGE_CONDITION = 1e4

AdapterTerm = tuple[torch.Tensor, str]  # (block, variant)


# --- dtype policy. Two rules on purpose: a layer's GEMMs and adds run in the promoted dtype of their
# operands (PEFT's eager rule), while merges and folds of W accumulate in fp32 at least (one rounding).


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The promoted dtype of the operands: what a layer's GEMMs and adds run in, as PEFT computes them."""
    return functools.reduce(torch.promote_types, dtypes)


def accumulate_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32 at least: merged weights, bat folds and half-precision chunk sums accumulate in it."""
    return compute_dtype(torch.float32, *dtypes)


# --- which variant a block's shape means


def block_variant(block_shape: Sequence[int], out_features: int) -> str:
    """The variant of a block on a Linear with `out_features` outputs (MissConfig.block_shape inverted):
    [out // r, r, r] is bat, [r, out] balance, [r, mini_r] mini. Symbolic sizes count as equal only
    when provably so (no guard)."""
    if len(block_shape) == 3:
        return "bat"
    return "balance" if statically_known_true(block_shape[1] == out_features) else "mini"


def chunk_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    """S(x)[..., j] = sum of x[..., i] over i % r == j; x zero-padded to a multiple of r."""
    pad = (-x.shape[-1]) % r
    if pad:
        x = F.pad(x, (0, pad))
    chunks = x.reshape(*x.shape[:-1], x.shape[-1] // r, r)
    if accumulate_dtype(x.dtype) != x.dtype:
        # fp32 accumulation, one rounding: what torch's half-precision sum does anyway; spelled out,
        # Inductor's CPU codegen does not declare one accumulator twice when two layers sum one x.
        return chunks.sum(-2, dtype=accumulate_dtype(x.dtype)).to(x.dtype)
    return chunks.sum(-2)


def expand_block(block: torch.Tensor, variant: str, out_features: int) -> torch.Tensor:
    """The [r, out] matrix D of balance/mini (mini repeats its [r, mini_r] block along out)."""
    if variant == "balance":
        return block
    if variant == "mini":
        return block.repeat(1, out_features // block.shape[1])
    raise ValueError(f"expand_block is for balance/mini blocks, got variant {variant!r}")


def to_bat_blocks(weight: torch.Tensor, r: int) -> torch.Tensor:
    """[out, in] -> [out // r, in // r, r, r]: element [p, q] is block W_pq."""
    out_features, in_features = weight.shape
    return weight.reshape(out_features // r, r, in_features // r, r).permute(0, 2, 1, 3)


def from_bat_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """[out // r, in // r, r, r] -> [out, in], the inverse of to_bat_blocks."""
    n_out, n_in, r, _ = blocks.shape
    return blocks.permute(0, 2, 1, 3).reshape(n_out * r, n_in * r)


def delta_weight(weight: torch.Tensor, block: torch.Tensor, variant: str) -> torch.Tensor:
    """dW with W + dW the merged weight; computed in fp32 (or wider) whatever the inputs' dtypes."""
    dtype = accumulate_dtype(weight.dtype, block.dtype)
    out_features, in_features = weight.shape
    if variant == "bat":
        r = block.shape[-1]
        w_blocks = to_bat_blocks(weight.to(dtype), r)
        d = block.to(dtype)[:, None]  # [out // r, 1, r, r], broadcast over column blocks q
        return from_bat_blocks(w_blocks @ d + d)
    d = expand_block(block, variant, out_features).to(dtype)
    r = d.shape[0]
    n_chunks = -(-in_features // r)
    return d.t().repeat(1, n_chunks)[:, :in_features]


def merged_weight(weight: torch.Tensor, block: torch.Tensor, variant: str) -> torch.Tensor:
    """W' = W + dW, in the weight's dtype."""
    return (weight.to(accumulate_dtype(weight.dtype, block.dtype)) + delta_weight(weight, block, variant)).to(weight.dtype)


def check_bat_unmerge(block: torch.Tensor, max_condition: float = MAX_UNMERGE_CONDITION) -> torch.Tensor:
    """I + D_p for every p, in fp32 or wider; raises when any is singular or ill-conditioned."""
    r = block.shape[-1]
    dtype = accumulate_dtype(block.dtype)
    eye_plus_d = torch.eye(r, dtype=dtype, device=block.device) + block.to(dtype)
    condition = torch.linalg.cond(eye_plus_d)
    bad = ~torch.isfinite(condition) | (condition > max_condition)
    if bad.any():
        worst = int(torch.nan_to_num(condition, nan=float("inf")).argmax())
        raise ValueError(
            f"cannot unmerge bat block {tuple(block.shape)}: I + D_p is singular or ill-conditioned for "
            f"{int(bad.sum())} of {block.shape[0]} row blocks (worst p={worst}, condition number "
            f"{float(condition[worst]):.3g} > {max_condition:.3g}); unmerging would return garbage. "
            "Reload the base weights instead."
        )
    return eye_plus_d


def fold_weight(weight: torch.Tensor, blocks: Sequence[torch.Tensor], variants: Sequence[str]) -> torch.Tensor:
    """The weight with every adapter merged in order, in the weight's dtype."""
    for block, variant in zip(blocks, variants, strict=True):
        weight = merged_weight(weight, block, variant)
    return weight


def unmerged_weight(
    merged: torch.Tensor,
    block: torch.Tensor,
    variant: str,
    max_condition: float = MAX_UNMERGE_CONDITION,
) -> torch.Tensor:
    """W from W'. Bat inverts blockwise in fp32 and refuses when I + D_p is (nearly) singular."""
    dtype = accumulate_dtype(merged.dtype, block.dtype)
    if variant != "bat":
        return (merged.to(dtype) - delta_weight(merged, block, variant)).to(merged.dtype)
    eye_plus_d = check_bat_unmerge(block, max_condition)
    d = block.to(dtype)
    w_blocks = to_bat_blocks(merged.to(dtype), block.shape[-1])
    restored = (w_blocks - d[:, None]) @ torch.linalg.inv(eye_plus_d.to(dtype))[:, None]
    return from_bat_blocks(restored).to(merged.dtype)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    adapters: Sequence[AdapterTerm],
    dropouts: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> torch.Tensor:
    """y = x @ W'.T + b for the active adapters, with PEFT's dtype rules.

    balance/mini: base output in x's dtype, then S(dropout(x in the block's dtype)) @ D added in
    the promoted dtype, and the sum cast back to x's dtype. Any bat adapter: the folded weight in
    fp32, cast to the promoted dtype of weight and blocks, then one linear (bat has no dropout).
    """
    if any(variant == "bat" for _, variant in adapters):
        folded = weight
        for block, variant in adapters:
            folded = folded.to(accumulate_dtype(folded.dtype, block.dtype)) + delta_weight(folded, block, variant)
        dtype = compute_dtype(weight.dtype, *[block.dtype for block, _ in adapters])
        bias = None if bias is None else bias.to(dtype)
        return F.linear(x.to(dtype), folded.to(dtype), bias).to(x.dtype)

    result = F.linear(x, weight, bias)
    for index, (block, variant) in enumerate(adapters):
        x_adapter = x.to(block.dtype)
        if dropouts is not None:
            x_adapter = dropouts[index](x_adapter)
        d = expand_block(block, variant, weight.shape[0])
        result = result + chunk_sum(x_adapter, d.shape[0]) @ d
    return result.to(x.dtype)
