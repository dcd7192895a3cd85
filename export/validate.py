"""Validation of an export: onnxruntime (CPU) against PyTorch on the example inputs, padded batches
(when an attention mask is an input), another size (dynamic exports) and any inputs the caller adds.

Only the positions the case's attention mask keeps are compared (padded positions mean nothing):
an output [batch, ...] is masked along its first axis after batch whose size is the mask's length
and whose size the graph leaves dynamic (a KV cache's head count may equal the mask's length);
when no axis has that length and the output's sequence axis (dim 1 of a 3-D or larger output) is
shorter than the mask (a KV-cache step: the mask covers past + current), along that axis with the
mask's last columns. Other outputs (pooled rows, outputs without a batch axis) are compared whole.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .inputs import attention_mask, feeds, padded, resized
from .runtime import load_session

__all__ = ["validate_export", "expected_outputs", "validation_cases", "kept_positions", "Case", "TOLERANCE"]

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class Case:
    """One set of inputs validation runs; `mask`: its attention mask [batch, length], if any."""

    what: str
    args: tuple
    kwargs: dict[str, Any]
    mask: torch.Tensor | None = None


def validation_cases(model: nn.Module, args: tuple, kwargs: Mapping[str, Any], resize: bool,
                     extra: Sequence[Mapping[str, Any]] = ()) -> list[Case]:
    """The example; with a mask, the same batch left- and right-padded (rows of different real lengths);
    with `resize`, the inputs one row and two positions longer; then each of `extra` (kwargs)."""
    found: dict[str, tuple[tuple, dict[str, Any]] | None] = {"the example": (args, dict(kwargs))}
    for side in ("left", "right"):
        found[f"a {side}-padded batch"] = padded(model, args, kwargs, side)
    if resize:
        found["another size"] = resized(model, args, kwargs)
    for index, inputs in enumerate(extra):
        found[f"validation input {index}"] = ((), dict(inputs))
    return [Case(what, *inputs, attention_mask(model, *inputs)) for what, inputs in found.items() if inputs is not None]


@torch.no_grad()
def expected_outputs(model: nn.Module, cases: Sequence[Case]) -> list[list[torch.Tensor]]:
    """PyTorch's outputs for each case. The exporter takes them before it merges, so a merged graph is
    checked against the adapters as they run, not against its own merged weights."""
    return [[t for t in tree_leaves(model(*case.args, **case.kwargs)) if isinstance(t, torch.Tensor)]
            for case in cases]


def kept_positions(output: torch.Tensor, mask: torch.Tensor | None,
                   static_axes: Collection[int] = ()) -> torch.Tensor | None:
    """Bool, broadcastable to `output`: the elements at positions `mask` keeps (see the module's rule);
    None when every element is compared. static_axes: the output's axes of fixed size in the graph
    (heads, head size, vocab), never a sequence axis."""
    if mask is None or output.dim() < 2 or output.shape[0] != mask.shape[0]:
        return None
    batch, length = mask.shape
    keep = mask != 0
    axis = next((axis for axis in range(1, output.dim())
                 if output.shape[axis] == length and axis not in static_axes), None)
    if axis is None:
        if output.dim() < 3 or output.shape[1] > length:
            return None
        axis, keep = 1, keep[:, length - output.shape[1]:]
    shape = [batch] + [1] * (output.dim() - 1)
    shape[axis] = output.shape[axis]
    return keep.reshape(shape)


def _static_axes(shape: Sequence[int | str | None]) -> set[int]:
    """The axes a graph fixes in size, where it leaves some other axis dynamic; none in a static export,
    where the sequence axis is fixed too."""
    if all(isinstance(size, int) for size in shape):
        return set()
    return {axis for axis, size in enumerate(shape) if isinstance(size, int)}


def _errors(got: torch.Tensor, want: torch.Tensor, keep: torch.Tensor | None) -> tuple[float, float]:
    """Largest abs and rel error over the kept elements; a NaN on one side only counts as infinite."""
    got, want = got.float(), want.float()
    difference = (got - want).abs()
    difference = torch.where(got.isnan() & want.isnan(), 0.0, difference.nan_to_num(nan=float("inf")))
    magnitude = want.abs().nan_to_num(nan=0.0)
    if keep is not None:
        keep = keep.expand_as(difference)
        difference, magnitude = difference[keep], magnitude[keep]
    if difference.numel() == 0:
        return 0.0, 0.0
    error = difference.max().item()
    return error, error / max(magnitude.max().item(), 1e-6)


def validate_export(model: nn.Module, path: Path, cases: Sequence[Case],
                    expected: list[list[torch.Tensor]] | None = None) -> tuple[float, float]:
    """Largest abs and rel error over every output and case; raises past the dtype's tolerance.
    expected: from expected_outputs (default: `model`'s outputs now)."""
    session = load_session(path, device="cpu")
    if expected is None:
        expected = expected_outputs(model, cases)
    worst_abs, worst_rel = 0.0, 0.0
    static_axes = {output.name: _static_axes(output.shape) for output in session.session.get_outputs()}
    for case, wanted in zip(cases, expected, strict=True):
        actual = session.run(feeds(session.input_names, case.args, case.kwargs))
        if len(actual) != len(wanted):
            raise ValueError(f"{path}: onnxruntime returned {len(actual)} outputs, torch {len(wanted)}")
        for name, got, want in zip(session.output_names, actual, wanted, strict=True):
            if tuple(got.shape) != tuple(want.shape):
                raise ValueError(f"{path}: output {name!r} on {case.what} has shape {tuple(got.shape)} in onnxruntime "
                                 f"and {tuple(want.shape)} in torch; the export is wrong, not saved")
            error, relative = _errors(got, want, kept_positions(want, case.mask, static_axes[name]))
            tolerance = TOLERANCE.get(want.dtype, 1e-4)
            if error > tolerance and relative > tolerance:
                raise ValueError(
                    f"{path}: output {name!r} {tuple(want.shape)} on {case.what} differs from torch by {error:.3g} "
                    f"(relative {relative:.3g}), beyond {tolerance:g}; the export is wrong, not saved. Report it "
                    "with the model config."
                )
            worst_abs, worst_rel = max(worst_abs, error), max(worst_rel, relative)
    return worst_abs, worst_rel
