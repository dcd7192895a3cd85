"""Peak memory of a step, above what was allocated before it.

CUDA: torch's allocator statistics. CPU (no allocator statistics there): every allocation and
free of torch's CPU allocator during the steps, as the profiler records them
(`profile_memory=True`), summed in time order; the peak of that running sum is the peak of live
tensor bytes, exact and repeatable. It leaves out what lives outside torch's allocator (oneDNN
and MKL scratch space), as the CUDA figure does.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def step_peak_mib(step: Callable[[], object], device: str, steps: int = 2) -> float:
    """Peak MiB above the allocated baseline while running `step` `steps` times (after warm-up)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - baseline) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        for _ in range(steps):
            step()
    events = sorted((event.start_ns(), event.nbytes()) for event in profiler.profiler.kineto_results.events()
                    if event.name() == "[memory]")
    return max(itertools.accumulate((nbytes for _, nbytes in events), initial=0)) / 2**20
