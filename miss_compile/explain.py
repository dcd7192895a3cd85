"""explain(model, *args, **kwargs): which Linears miss_backend turns into MiSS ops, and why not the rest."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn

from .passes import PassReport, rewrite_miss_linears

__all__ = ["explain", "pass_only_backend"]


def pass_only_backend(reports: list[PassReport], merge: bool = False) -> Callable:
    """A backend that runs the MiSS pass and then the rewritten graph as it is (no AOT, no Inductor)."""

    def backend(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> Callable:
        reports.append(rewrite_miss_linears(gm.graph, merge=merge))
        gm.recompile()
        return gm.forward

    return backend


def explain(model: nn.Module, *args: Any, merge: bool = False, **kwargs: Any) -> PassReport:
    """Trace `model(*args, **kwargs)` once with Dynamo and report what the pass does to it."""
    reports: list[PassReport] = []
    compiled = torch.compile(model, backend=pass_only_backend(reports, merge=merge))
    with torch.no_grad():
        compiled(*args, **kwargs)
    combined = PassReport()
    for report in reports:
        combined.rewritten.extend(report.rewritten)
        combined.skipped.extend(report.skipped)
    return combined
