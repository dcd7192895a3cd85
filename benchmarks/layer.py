"""Table 1: one adapted Linear, prefill-like and decode-like inputs, against the compiled base Linear."""

from __future__ import annotations

import copy

import torch
from torch import nn

from miss_compile import make_backend
from miss_compile.timing import interleaved_ms

from .models import DTYPES, OneLinear, peft_lora, peft_miss

FROZEN_LIMIT = "limit: compiled base, frozen (for merged)"
REDUCE_OVERHEAD_LIMIT = "limit: compiled base, mode=reduce-overhead (CUDA only)"
REDUCE_OVERHEAD = "miss_backend, mode=reduce-overhead (CUDA only)"


def _contenders(features: int, r: int, dtype: torch.dtype, fp32_adapters: bool) -> dict[str, tuple[nn.Module, object]]:
    """name -> (eager module, backend); backend None means eager, "inductor" stock torch.compile."""
    base = OneLinear(features, dtype).eval()
    targets = ["proj"]
    balance = peft_miss(base, "balance", r, targets, fp32_adapters).eval()
    frozen = copy.deepcopy(balance).requires_grad_(False)  # merge=True folds frozen adapters only
    bat = peft_miss(base, "bat", r, targets, fp32_adapters).eval()
    mini = peft_miss(base, "mini", r, targets, fp32_adapters).eval()
    lora = peft_lora(base, r // 2, targets, fp32_adapters).eval()  # r/2: same trainable parameters
    return {
        "limit: compiled base": (base, "inductor"),
        # Merged models compile under freezing, where Inductor may pick other GEMM kernels (packed
        # weights): their limit is the base compiled the same way.
        FROZEN_LIMIT: (copy.deepcopy(base).requires_grad_(False), "inductor"),
        "miss_backend": (balance, make_backend()),
        "miss_backend merged": (frozen, make_backend(merge=True)),
        "PEFT MiSS eager": (balance, None),
        "PEFT MiSS compiled": (balance, "inductor"),
        f"PEFT LoRA r={r // 2} compiled": (lora, "inductor"),
        "bat: miss_backend": (bat, make_backend()),
        "bat: PEFT compiled": (bat, "inductor"),
        "mini: miss_backend": (mini, make_backend()),
        "mini: PEFT compiled": (mini, "inductor"),
    }


def _compiled(name: str, module: nn.Module, backend: object) -> nn.Module:
    if backend is None:
        return module
    compiled = torch.compile(module, backend=backend, dynamic=False, fullgraph=True)
    if getattr(backend, "__name__", "") != "miss_backend_merged" and name != FROZEN_LIMIT:
        return compiled

    traced: set[torch.Size] = set()

    def frozen(x: torch.Tensor) -> torch.Tensor:
        if x.shape in traced:  # the patch costs ~40 us a call: only tracing needs it
            return compiled(x)
        traced.add(x.shape)
        # Freezing on while Dynamo traces: parameters become constants and W + dW is folded once.
        with torch._inductor.config.patch(freezing=True):
            return compiled(x)

    return frozen


def run(quick: bool, device: str, repeats: int, dtypes: list[str] | None = None) -> list[dict]:
    features = 256 if quick else (4096 if device == "cuda" else 2048)
    r = 16 if quick else 64
    prefill = 128 if quick else 2048
    inputs = {f"prefill {prefill}": (1, prefill), "decode 1": (1, 1), "decode 8": (8, 1)}
    if quick:  # every shape is one more compile per contender
        del inputs["decode 8"]
    dtypes = dtypes or (["fp32"] if quick else list(DTYPES))
    rows = []
    for dtype_name in dtypes:
        dtype, fp32_adapters = DTYPES[dtype_name]
        torch._dynamo.reset()
        contenders = {name: (module.to(device), backend)
                      for name, (module, backend) in _contenders(features, r, dtype, fp32_adapters).items()}
        runners = {name: _compiled(name, module, backend) for name, (module, backend) in contenders.items()}
        if device == "cuda":  # CUDA graphs: what decode needs, one launch per step
            for name, base_name in ((REDUCE_OVERHEAD_LIMIT, "limit: compiled base"), (REDUCE_OVERHEAD, "miss_backend")):
                module, backend = contenders[base_name]
                contenders[name] = (module, "inductor" if backend == "inductor" else "miss")
                runners[name] = torch.compile(module, backend=contenders[name][1], mode="reduce-overhead",
                                              dynamic=False, fullgraph=True)
        for input_name, (batch, tokens) in inputs.items():
            x = torch.randn(batch, tokens, features, dtype=dtype, device=device)
            with torch.no_grad():
                _check_parity(runners, contenders, x, dtype)
                times = interleaved_ms({name: (lambda f=f, x=x: f(x)) for name, f in runners.items()}, repeats,
                                       device=device)
            limit = times["limit: compiled base"]
            for name, ms in times.items():
                rows.append({"table": "layer", "dtype": dtype_name, "input": input_name,
                             "shape": f"{features}x{features}, r={r}", "contender": name, "ms": ms,
                             "ratio": ms / limit})
    return rows


def _check_parity(runners: dict, contenders: dict, x: torch.Tensor, dtype: torch.dtype) -> None:
    """Each compiled contender must compute what its eager module does: a fast wrong answer is no answer."""
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for name, runner in runners.items():
        module, backend = contenders[name]
        if backend is None:
            continue
        expected = module(x)
        got = runner(x)
        error = (got.float() - expected.float()).abs().max().item()
        scale = expected.float().abs().max().item() + 1e-6
        if error > tolerance * max(1.0, scale):
            raise AssertionError(f"layer benchmark: {name} differs from its eager module by {error:.3e}")
