"""When to fold W + dW into the base GEMM: the rule of the lowering (forward) and the op (x's gradient).

A balance/mini adapter that reads x itself can run two ways around the base GEMM of a Linear:

  fold      x @ (W + dW).T (forward), grad @ (W + dW) (x's gradient): one pass that reads W and
            writes a weight-sized W + dW, then the base GEMM on it;
  separate  the base GEMM plus the adapter's own: forward S(x) @ D ([tokens, r] x [r, out]; the chunk
            sum reads x, the product enters the base GEMM as its input), backward grad @ D.T tiled
            to in features and added to grad @ W.

Memory decides. The folded W + dW is a transient as large as the weight, which stock Inductor on
PEFT's code never allocates: at an 8B-shaped layer (batch 1 x 512, fp32) the MLP weight is 224 MiB,
more than the whole step's activations, and folding it raised the training peak from stock's 181 MiB
to 386 MiB. So a fold is allowed only where W + dW is no larger than the GEMM's own output
([tokens, out] forward, [tokens, in] backward), a tensor the separate path allocates twice (the
product, then the sum): there the fold never raises the step's peak above stock's.

Time agrees wherever memory allows it: with tokens >= in (forward), the separate path's passes over
activations alone (x read by the chunk sum, the [tokens, out] product written and read back) move
more bytes than the fold's read and write of W, before its tokens * r * out multiply-adds; likewise
backward with tokens >= out. Measured (python -m benchmarks.fold_calibration, 2 CPU cores, fp32,
r=64, 256..4096 tokens, 1024..3584 features): the fold was the faster form at every point, so
below the bound the rule gives up up to ~1.5x on those two GEMMs for the peak (the table in
BENCHMARKS.md). The bound is per device kind; CUDA's is the same ratio, not yet measured on a GPU.
"""

from __future__ import annotations

import torch

__all__ = ["MAX_FOLD_OVER_OUTPUT", "folds", "folds_for"]

# The largest folded weight allowed, as a multiple of the GEMM's output (elements).
MAX_FOLD_OVER_OUTPUT = {
    "cpu": 1.0,  # measured: benchmarks/fold_calibration.py and the peaks in BENCHMARKS.md (2026-12-02)
    "cuda": 1.0,  # uncalibrated: no GPU run of benchmarks.fold_calibration yet
}


def folds(tokens: int | None, in_features: int, out_features: int, device_type: str, backward: bool) -> bool:
    """Whether to fold W + dW: the folded weight is no larger than the GEMM's output.

    `tokens` is x's row count (None when unknown: keep the separate GEMM); `backward` judges x's
    gradient (output [tokens, in]) instead of the forward (output [tokens, out]).
    """
    if tokens is None:
        return False
    output_width = in_features if backward else out_features
    bound = MAX_FOLD_OVER_OUTPUT.get(device_type, MAX_FOLD_OVER_OUTPUT["cpu"])
    return in_features * out_features <= bound * tokens * output_width


def folds_for(x: torch.Tensor, weight: torch.Tensor, backward: bool) -> bool:
    """`folds` for one miss.linear call. Dynamic sizes are judged by their hint, without a guard:
    a wrong guess costs time or memory, never correctness."""
    rows = x.numel() // x.shape[-1]
    tokens = rows.node.hint if isinstance(rows, torch.SymInt) else int(rows)
    out_features, in_features = weight.shape
    return folds(tokens, in_features, out_features, x.device.type, backward)
