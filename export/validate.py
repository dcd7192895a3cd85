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

__all__ = ["validate_export", "expected_outputs", "other_size"]

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


def _cases(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> list[tuple[tuple, dict]]:
    """The example inputs and, for a dynamic export, the same inputs at another size."""
    cases = [(args, kwargs)]
    if dynamic:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
        cases.append(((), {name: other_size(value, name) for name, value in bound.items()}))
    return cases


@torch.no_grad()
def expected_outputs(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> list[list[torch.Tensor]]:
    """PyTorch's outputs for each validation case. The exporter takes them before it merges, so a
    merged graph is checked against the adapters as they run, not against its own merged weights."""
    return [[t for t in tree_leaves(model(*case_args, **case_kwargs)) if isinstance(t, torch.Tensor)]
            for case_args, case_kwargs in _cases(model, args, kwargs, dynamic)]


def validate_export(model: nn.Module, path: Path, args: tuple, kwargs: dict, dynamic: bool,
                    expected: list[list[torch.Tensor]] | None = None) -> tuple[float, float]:
    """Largest abs and rel error over every output and input size; raises past the dtype's tolerance.
    expected: from expected_outputs (default: `model`'s outputs now)."""
    session = load_session(path, device="cpu")
    cases = _cases(model, args, kwargs, dynamic)
    if expected is None:
        expected = expected_outputs(model, args, kwargs, dynamic)
    worst_abs, worst_rel = 0.0, 0.0
    for (case_args, case_kwargs), wanted in zip(cases, expected, strict=True):
        actual = session.run(_feeds(model, case_args, case_kwargs, session.input_names))
        if len(actual) != len(wanted):
            raise ValueError(f"{path}: onnxruntime returned {len(actual)} outputs, torch {len(wanted)}")
        for name, got, want in zip(session.output_names, actual, wanted, strict=True):
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
