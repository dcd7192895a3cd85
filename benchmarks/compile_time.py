"""Table 3: compile time of a training step, miss_backend against stock Inductor, cold and warm.

The model: the PEFT MiSS Llama of the training table (quick: one adapted Linear).

Each measurement is a fresh process (nothing compiled in memory). Cold: an empty Inductor cache
directory; warm: a second process on the directory the cold one filled. Compile time is the
first step's time minus a steady step's.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BACKENDS = ("inductor", "miss_backend")


def _model_and_step_input(quick: bool, device: str):
    """Full: the PEFT MiSS Llama of the training table. Quick: one adapted Linear of our own, so the
    child process needs neither transformers nor PEFT (their imports alone cost ~10 s)."""
    import torch

    if quick:
        from miss_compile import MissConfig, apply_miss

        from .models import OneLinear

        model = apply_miss(OneLinear(64, torch.float32), MissConfig(r=8, target_modules=["proj"]))
        return model.to(device), {"x": torch.randn(2, 32, 64, device=device)}, lambda out: out.square().mean()
    from .models import SEVEN_PROJECTIONS, peft_miss
    from .training import FULL

    model = peft_miss(FULL.build(), "balance", 64, SEVEN_PROJECTIONS).to(device).train()
    input_ids = torch.randint(0, FULL.vocab, (4, 256), device=device)
    return model, {"input_ids": input_ids, "labels": input_ids}, lambda out: out.loss


def _measure(backend_name: str, quick: bool, device: str) -> float:
    """In the child process: seconds the first compiled training step costs beyond a steady one."""
    import torch

    from miss_compile import make_backend

    model, inputs, loss_of = _model_and_step_input(quick, device)
    backend = make_backend() if backend_name == "miss_backend" else "inductor"
    compiled = torch.compile(model, backend=backend)

    def step() -> float:
        start = time.perf_counter()
        loss_of(compiled(**inputs)).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first = step()
    steady = statistics.median(step() for _ in range(3))
    return first - steady


def _start_child(backend: str, cache_dir: str, quick: bool, device: str) -> subprocess.Popen:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    command = [sys.executable, "-m", "benchmarks.compile_time", backend, device] + (["--quick"] if quick else [])
    return subprocess.Popen(command, env=env, cwd=Path(__file__).parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(child: subprocess.Popen, backend: str) -> float:
    stdout, stderr = child.communicate(timeout=1800)
    if child.returncode != 0:
        raise RuntimeError(f"compile-time child for {backend} failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])["compile_s"]


def _children(caches: dict[str, str], quick: bool, device: str) -> dict[str, float]:
    """Stock then ours, one after the other; --quick runs the pair side by side (it makes no claims,
    and the suite runs it)."""
    if quick:
        started = {backend: _start_child(backend, caches[backend], quick, device) for backend in BACKENDS}
        return {backend: _result(child, backend) for backend, child in started.items()}
    return {backend: _result(_start_child(backend, caches[backend], quick, device), backend) for backend in BACKENDS}


def run(quick: bool, device: str, rounds: int) -> list[dict]:
    seconds: dict[tuple[str, str], list[float]] = {(b, c): [] for b in BACKENDS for c in ("cold", "warm")}
    for _ in range(rounds):
        caches = {backend: tempfile.mkdtemp(prefix=f"miss-bench-{backend}-") for backend in BACKENDS}
        for cache in ("cold", "warm"):  # interleaved: stock and ours, cold then warm on the same dirs
            for backend, value in _children(caches, quick, device).items():
                seconds[(backend, cache)].append(value)
        for folder in caches.values():
            shutil.rmtree(folder, ignore_errors=True)
    rows = []
    for cache in ("cold", "warm"):
        stock = statistics.median(seconds[("inductor", cache)])
        for backend in BACKENDS:
            value = statistics.median(seconds[(backend, cache)])
            rows.append({"table": "compile", "model": "one adapted Linear" if quick else "PEFT MiSS Llama (training table)",
                         "cache": cache, "contender": backend, "s": value,
                         "ratio": value / stock, "rounds": rounds})
    return rows


if __name__ == "__main__":
    backend_name, device_name = sys.argv[1], sys.argv[2]
    print(json.dumps({"compile_s": _measure(backend_name, "--quick" in sys.argv, device_name)}))
