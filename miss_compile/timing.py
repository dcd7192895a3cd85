"""Interleaved medians: every contender runs once per round, so machine noise hits all alike."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

MIN_SAMPLE_MS = 20.0  # a sample of a 1 ms decode call is many calls: one call is mostly timer noise


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed_ms(fn: Callable[[], object], calls: int, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def interleaved_ms(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 3,
                   device: str = "cpu") -> dict[str, float]:
    """Median milliseconds per call of each contender over `repeats` interleaved rounds.

    Warm-up rounds run first (compiles, autotuning, allocator growth) and are not counted. A
    sample is as many back-to-back calls as fill MIN_SAMPLE_MS (one, for calls longer than that).
    """
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    calls = {name: max(1, math.ceil(MIN_SAMPLE_MS / max(_timed_ms(fn, 1, device), 1e-3)))
             for name, fn in contenders.items()}
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            samples[name].append(_timed_ms(fn, calls[name], device) / calls[name])
    return {name: statistics.median(values) for name, values in samples.items()}
