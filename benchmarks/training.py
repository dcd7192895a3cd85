"""Table 2: one training step (forward, backward, AdamW) of a Llama-shaped model, and its peak memory.

The limit is the compiled base model with every weight frozen and only the first layer's input
norm trainable: backward still runs through every layer, but computes no weight gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from miss_compile import make_backend

from .memory import step_peak_mib
from .models import SEVEN_PROJECTIONS, LlamaShape, peft_lora, peft_miss, trainable_parameters
from .timing import interleaved_ms

FULL = LlamaShape(hidden=512, intermediate=1408, layers=4)
QUICK = LlamaShape(hidden=64, intermediate=176, layers=1, vocab=256)  # compile time grows with layers


def _limit_model(base: nn.Module) -> nn.Module:
    import copy

    model = copy.deepcopy(base).requires_grad_(False)
    model.model.layers[0].input_layernorm.weight.requires_grad_(True)
    return model


def _contenders(shape: LlamaShape, r: int) -> dict[str, tuple[nn.Module, object]]:
    base = shape.build()
    targets = SEVEN_PROJECTIONS
    return {
        "limit: compiled base, frozen": (_limit_model(base), "inductor"),
        "miss_backend": (peft_miss(base, "balance", r, targets), make_backend()),
        "PEFT MiSS compiled": (peft_miss(base, "balance", r, targets), "inductor"),
        f"PEFT LoRA r={r // 2} compiled": (peft_lora(base, r // 2, targets), "inductor"),
        "PEFT MiSS eager": (peft_miss(base, "balance", r, targets), None),
        "bat: miss_backend": (peft_miss(base, "bat", r, targets), make_backend()),
        "bat: PEFT compiled": (peft_miss(base, "bat", r, targets), "inductor"),
    }


def _step(model: nn.Module, backend: object, input_ids: torch.Tensor):
    runner = model if backend is None else torch.compile(model, backend=backend, fullgraph=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> torch.Tensor:
        loss = runner(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _check_first_losses(first: dict[str, torch.Tensor]) -> None:
    """Contenders that start from the same MiSS model must agree on the first loss."""
    group = {name: loss for name, loss in first.items() if name.startswith(("miss_backend", "PEFT MiSS"))}
    reference = group["PEFT MiSS eager"]
    for name, loss in group.items():
        if abs(loss.item() - reference.item()) > 1e-4 * max(1.0, abs(reference.item())):
            raise AssertionError(f"training benchmark: first loss of {name} is {loss.item():.6f}, "
                                 f"eager PEFT MiSS gives {reference.item():.6f}")
    bat = [loss.item() for name, loss in first.items() if name.startswith("bat")]
    if abs(bat[0] - bat[1]) > 1e-4 * max(1.0, abs(bat[1])):
        raise AssertionError(f"training benchmark: bat first losses differ: {bat}")


def run(quick: bool, device: str, repeats: int) -> list[dict]:
    shape, r = (QUICK, 8) if quick else (FULL, 64)
    batch, seq = (2, 32) if quick else (4, 256)
    torch._dynamo.reset()
    input_ids = torch.randint(0, shape.vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    contenders = _contenders(shape, r)
    steps = {name: _step(model.to(device).train(), backend, input_ids)
             for name, (model, backend) in contenders.items()}
    _check_first_losses({name: step() for name, step in steps.items()})
    times = interleaved_ms(steps, repeats, warmup=2, device=device)
    memory = {name: step_peak_mib(step, device) for name, step in steps.items()}
    limit = times["limit: compiled base, frozen"]
    setting = f"Llama {shape.layers}x{shape.hidden} (int {shape.intermediate}), batch {batch}x{seq}, r={r}, fp32"
    return [{"table": "training", "setting": setting, "contender": name, "ms": ms, "ratio": ms / limit,
             "peak_mib": memory[name], "trainable": trainable_parameters(contenders[name][0])}
            for name, ms in times.items()]
