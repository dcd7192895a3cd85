"""Peak memory of a step, above what was resident before it.

CUDA: torch's allocator statistics. CPU (no allocator statistics there): the process's peak
resident set (VmHWM), reset through /proc/self/clear_refs after glibc has handed freed memory
back (malloc_trim), so the peak covers only the measured steps of one contender. Linux only;
elsewhere the column reads n/a.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable

import torch


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_freed_memory() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def step_peak_mib(step: Callable[[], object], device: str, steps: int = 2) -> float | None:
    """Peak MiB above the resident baseline while running `step` `steps` times (after warm-up)."""
    if device == "cuda":
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - baseline) / 2**20
    try:
        _release_freed_memory()
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set
        baseline = _rss_kib("VmRSS")
    except OSError:
        return None
    for _ in range(steps):
        step()
    return (_rss_kib("VmHWM") - baseline) / 1024
