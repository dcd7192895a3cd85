"""miss_backend: Inductor with the MiSS pass (pre-grad) and the MiSS lowerings.

    compiled = torch.compile(model, backend=miss_backend)            # or backend="miss"
    compiled = torch.compile(model, backend=make_backend(merge=True))  # frozen adapters folded into W

The backend rewrites the Dynamo graph before handing it to Inductor, so every compile reports
what it did (AOTAutograd's cache is looked up before Inductor's own pre-grad passes run). The
same pass is also registered as Inductor's pre-grad custom pass, a CustomGraphPass whose uuid
covers the source of the pass, the ops and their lowerings: Inductor's FX graph cache and
AOTAutograd's cache never serve code built by another version of them.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import lowering, ops, passes
from .passes import PassReport, rewrite_miss_linears

__all__ = ["miss_backend", "make_backend", "MissGraphPass"]

logger = logging.getLogger(__name__)


class MissGraphPass(CustomGraphPass):
    def __init__(self, merge: bool = False) -> None:
        self.merge = merge
        self.reports: list[PassReport] = []

    def __call__(self, graph: fx.Graph) -> None:
        # Idempotent: on a graph the backend already rewrote it finds nothing left to do.
        rewrite_miss_linears(graph, merge=self.merge)

    def rewrite(self, gm: fx.GraphModule) -> PassReport:
        report = rewrite_miss_linears(gm.graph, merge=self.merge)
        gm.recompile()
        self.reports.append(report)
        logger.info("%s", report)
        return report

    def uuid(self) -> bytes:
        digest = hashlib.sha256(f"merge={self.merge}".encode())
        for module in (passes, ops, lowering):
            digest.update(inspect.getsource(module).encode())
        return digest.digest()


def make_backend(merge: bool = False, config_patches: dict[str, Any] | None = None) -> Callable:
    """A torch.compile backend. merge=True folds frozen adapters into W and turns on Inductor's
    freezing, so inference costs the base model; in-place changes to the blocks then need a
    recompile (torch._dynamo.reset()), since frozen weights are compile-time constants.
    Freezing must also be on while Dynamo traces (it decides there whether parameters are
    constants): run the first call under `torch.no_grad()` and
    `torch._inductor.config.patch(freezing=True)`; the backend warns when that was not the case."""
    graph_pass = MissGraphPass(merge=merge)
    patches = {"pre_grad_custom_pass": graph_pass}
    if merge:
        patches["freezing"] = True
    patches.update(config_patches or {})

    def backend(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> Callable:
        report = graph_pass.rewrite(gm)
        if merge and any(item.merged for item in report.rewritten):
            _warn_unless_parameters_are_constants(backend)
        return compile_fx(gm, example_inputs, config_patches=patches)

    backend.graph_pass = graph_pass  # reports of every graph compiled, for tests and explain()
    backend.__name__ = "miss_backend" if not merge else "miss_backend_merged"
    return backend


def _warn_unless_parameters_are_constants(backend: Callable) -> None:
    """Dynamo hands parameters to a backend as constants only when Inductor's freezing is on, and
    grad off, while it traces; otherwise they arrive as inputs and W + dW is rebuilt on every call
    (right numbers, but a pass over W per call: 2.5x the base GEMM at one token, 2048x2048)."""
    if torch._inductor.config.freezing and not torch.is_grad_enabled():
        return
    if getattr(backend, "_warned_inputs", False):
        return
    backend._warned_inputs = True
    logger.warning(
        "make_backend(merge=True): the model was traced with %s, so W + dW is recomputed on every "
        "call instead of once. Trace and run under torch.no_grad() with freezing on: "
        "`with torch.no_grad(), torch._inductor.config.patch(freezing=True): compiled(...)` "
        "(or set torch._inductor.config.freezing = True before the first call).",
        "gradients enabled" if torch.is_grad_enabled() else "torch._inductor.config.freezing off",
    )


# backend="miss" resolves through the `torch_dynamo_backends` entry point (pyproject.toml).
miss_backend = make_backend()
