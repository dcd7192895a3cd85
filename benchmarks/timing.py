"""Interleaved medians: every contender runs once per round, so machine noise hits all alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_ms(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 3,
                   device: str = "cpu") -> dict[str, float]:
    """Median milliseconds per call of each contender over `repeats` interleaved rounds.

    Warm-up rounds run first (compiles, autotuning, allocator growth) and are not counted.
    """
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}
