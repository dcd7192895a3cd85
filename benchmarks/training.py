"""Table 2: one training step (forward, backward, AdamW) of a Llama-shaped model, and its peak memory.

The limit is the compiled base model with every weight frozen and only the first layer's input
norm trainable: backward still runs through every layer, but computes no weight gradients.
A second floor row adds the weight gradient of every adapted Linear (computed, never applied):
bat's block gradient needs that full GEMM, so no bat implementation can beat this row.
"""

from __future__ import annotations

import torch
from torch import nn

from miss_compile import make_backend
from miss_compile.timing import interleaved_ms

from .memory import step_peak_mib
from .models import SEVEN_PROJECTIONS, LlamaShape, peft_lora, peft_miss, trainable_parameters

FULL = LlamaShape(hidden=512, intermediate=1408, layers=4)
QUICK = LlamaShape(hidden=64, intermediate=176, layers=1, vocab=256)  # compile time grows with layers


def _limit_model(base: nn.Module) -> nn.Module:
    import copy

    model = copy.deepcopy(base).requires_grad_(False)
    model.model.layers[0].input_layernorm.weight.requires_grad_(True)
    return model


LIMIT = "limit: compiled base, frozen"
BAT_FLOOR = "floor for bat: limit + weight grads"


def _weight_gradient_model(base: nn.Module, targets: list[str]) -> nn.Module:
    model = _limit_model(base)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            module.weight.requires_grad_(True)
    return model


def _contenders(shape: LlamaShape, r: int) -> dict[str, tuple[nn.Module, object]]:
    base = shape.build()
    targets = SEVEN_PROJECTIONS
    return {
        LIMIT: (_limit_model(base), "inductor"),
        BAT_FLOOR: (_weight_gradient_model(base, targets), "inductor"),
        "miss_backend": (peft_miss(base, "balance", r, targets), make_backend()),
        "PEFT MiSS compiled": (peft_miss(base, "balance", r, targets), "inductor"),
        f"PEFT LoRA r={r // 2} compiled": (peft_lora(base, r // 2, targets), "inductor"),
        "PEFT MiSS eager": (peft_miss(base, "balance", r, targets), None),
        "bat: miss_backend": (peft_miss(base, "bat", r, targets), make_backend()),
        "bat: PEFT compiled": (peft_miss(base, "bat", r, targets), "inductor"),
    }


def _step(model: nn.Module, backend: object, input_ids: torch.Tensor, apply_all: bool):
    runner = model if backend is None else torch.compile(model, backend=backend, fullgraph=False)
    # The bat floor computes weight gradients but applies only what the limit applies: AdamW over
    # the projections' weights would time the optimizer, not the GEMM.
    applied = [p for p in model.parameters() if p.requires_grad and (apply_all or p.dim() == 1)]
    # fused=True for every contender: the optimizer's per-tensor launches are not what is compared.
    optimizer = torch.optim.AdamW(applied, lr=1e-4, fused=True)

    def step() -> torch.Tensor:
        loss = runner(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)  # the bat floor's weight grads too
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
    steps = {name: _step(model.to(device).train(), backend, input_ids, apply_all=name != BAT_FLOOR)
             for name, (model, backend) in contenders.items()}
    _check_first_losses({name: step() for name, step in steps.items()})
    times = interleaved_ms(steps, repeats, warmup=2, device=device)
    memory = {name: step_peak_mib(step, device) for name, step in steps.items()}
    limit = times[LIMIT]
    setting = f"Llama {shape.layers}x{shape.hidden} (int {shape.intermediate}), batch {batch}x{seq}, r={r}, fp32"
    return [{"table": "training", "setting": setting, "contender": name, "ms": ms, "ratio": ms / limit,
             "peak_mib": memory[name], "trainable": trainable_parameters(contenders[name][0])}
            for name, ms in times.items()]
