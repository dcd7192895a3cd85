"""Validation of an export: onnxruntime (CPU) against PyTorch on the example inputs and one other size."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .onnx import _dynamic_dims
from .runtime import load_session

__all__ = ["validate_export", "other_size"]

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def other_size(value: Any, name: str = "") -> Any:
    """The same input one batch row and two positions longer (ids stay in range, masks stay ones)."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    shape = list(value.shape)
    for dim in _dynamic_dims(value, name):  # batch and sequence; a float input's features stay
        shape[dim] += 1 if dim == 0 else 2
    generator = torch.Generator().manual_seed(7)
    if "mask" in name:
        return torch.ones(shape, dtype=value.dtype)
    if value.is_floating_point():
        return torch.randn(shape, generator=generator).to(value.dtype)
    return torch.randint(0, int(value.max()) + 1, shape, generator=generator, dtype=value.dtype)


def _feeds(model: nn.Module, args: tuple, kwargs: dict, input_names: list[str]) -> dict[str, torch.Tensor]:
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    return {name: value for name, value in bound.items() if name in input_names}


def validate_export(model: nn.Module, path: Path, args: tuple, kwargs: dict, dynamic: bool) -> tuple[float, float]:
    """Largest abs and rel error over every output and input size; raises past the dtype's tolerance."""
    session = load_session(path, device="cpu")
    cases = [(args, kwargs)]
    if dynamic:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
        cases.append(((), {name: other_size(value, name) for name, value in bound.items()}))
    worst_abs, worst_rel = 0.0, 0.0
    for case_args, case_kwargs in cases:
        with torch.no_grad():
            expected = [t for t in tree_leaves(model(*case_args, **case_kwargs)) if isinstance(t, torch.Tensor)]
        actual = session.run(_feeds(model, case_args, case_kwargs, session.input_names))
        if len(actual) != len(expected):
            raise ValueError(f"{path}: onnxruntime returned {len(actual)} outputs, torch {len(expected)}")
        for name, got, want in zip(session.output_names, actual, expected, strict=True):
            error = (got.float() - want.float()).abs().max().item()
            relative = error / max(want.float().abs().max().item(), 1e-6)
            tolerance = TOLERANCE.get(want.dtype, 1e-4)
            shape = tuple(want.shape)
            if error > tolerance and relative > tolerance:
                raise ValueError(
                    f"{path}: output {name!r} {shape} differs from torch by {error:.3g} (relative {relative:.3g}), "
                    f"beyond {tolerance:g}; the export is wrong, not saved. Report it with the model config."
                )
            worst_abs, worst_rel = max(worst_abs, error), max(worst_rel, relative)
    return worst_abs, worst_rel
