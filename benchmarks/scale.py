"""Table: one decoder layer shaped like an 8B Llama, where people fine-tune: training step (with and
without gradient checkpointing) and prefill, with the training step's peak memory.

Hidden 4096, intermediate 14336, 32 heads, 8 KV heads, one layer between a 1024-token embedding and
LM head, r=64 on all seven projections, AdamW(fused) on the blocks. The limit is the compiled layer
with every weight frozen and its input norm trainable: backward runs through the layer and computes
no weight gradient. `vs stock` is each row's time over torch.compile(PEFT MiSS)'s in the same
interleaved run: miss_backend's row is the paired ratio, ours over stock on the same PEFT model.

The arithmetic floor of MiSS at this shape (`floor()`): what a step must do beyond the limit is the
block gradients S(x).T @ grad ([r, tokens] x [tokens, out] per projection) and the chunk sums; over
the base's GEMMs (forward and x's gradient: 2 * tokens * in * out per projection) that is
r / (2 * in) of each projection's base work.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from miss_compile import make_backend
from miss_compile.timing import interleaved_ms

from .memory import step_peak_mib
from .models import SEVEN_PROJECTIONS, LlamaShape, peft_lora, peft_miss, projections, trainable_parameters

SHAPE = LlamaShape(hidden=4096, intermediate=14336, layers=1, heads=32, kv_heads=8)
QUICK = LlamaShape(hidden=128, intermediate=448, layers=1, vocab=256, heads=4, kv_heads=2)
LIMIT = "limit: compiled layer, frozen"
OURS = "miss_backend"
STOCK = "PEFT MiSS compiled"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def floor(shape: LlamaShape, r: int) -> float:
    """The block gradients' multiply-adds over the base GEMMs' (forward and x's gradient), seven projections."""
    layer = projections(shape)
    base = sum(2 * in_features * out_features for in_features, out_features in layer)
    block_gradients = sum(r * out_features for _, out_features in layer)
    return block_gradients / base


def _limit(base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base).requires_grad_(False)
    model.model.layers[0].input_layernorm.weight.requires_grad_(True)
    return model


def _models(shape: LlamaShape, r: int, dtype: torch.dtype) -> dict[str, tuple[nn.Module, object]]:
    base = shape.build(dtype)
    fp32_adapters = dtype == torch.float32  # bf16 rows keep the blocks in bf16 (PEFT's autocast_adapter_dtype=False)
    return {
        LIMIT: (_limit(base), "inductor"),
        OURS: (peft_miss(base, "balance", r, SEVEN_PROJECTIONS, fp32_adapters), make_backend()),
        STOCK: (peft_miss(base, "balance", r, SEVEN_PROJECTIONS, fp32_adapters), "inductor"),
        f"PEFT LoRA r={r // 2} compiled": (peft_lora(base, r // 2, SEVEN_PROJECTIONS, fp32_adapters), "inductor"),
    }


def _training_step(model: nn.Module, backend: object, input_ids: torch.Tensor):
    runner = torch.compile(model, backend=backend)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def step() -> torch.Tensor:
        loss = runner(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _prefill(model: nn.Module, backend: object, input_ids: torch.Tensor):
    runner = torch.compile(model, backend=backend)

    def prefill() -> torch.Tensor:
        with torch.no_grad():
            return runner(input_ids=input_ids).logits

    return prefill


def _check(what: str, got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    error = (got.float() - expected.float()).abs().max().item()
    if error > tolerance * max(1.0, expected.float().abs().max().item()):
        raise AssertionError(f"scale benchmark ({what}): miss_backend differs from torch.compile(PEFT MiSS) by {error:.3e}")


def _rows(setting: str, times: dict[str, float], memory: dict[str, float] | None,
          models: dict[str, tuple[nn.Module, object]]) -> list[dict]:
    return [{"table": "scale", "setting": setting, "contender": name, "ms": ms, "ratio": ms / times[LIMIT],
             "vs_stock": ms / times[STOCK], "peak_mib": None if memory is None else memory[name],
             "trainable": trainable_parameters(models[name][0])} for name, ms in times.items()]


def _print(rows: list[dict]) -> list[dict]:
    """Each setting as it is measured: at this shape a setting takes minutes on a CPU."""
    from .report import table

    print(table(rows, ("setting",), ("contender", "ms", "ratio", "vs_stock", "peak_mib", "trainable")), flush=True)
    return rows


# transformers >= 5.25 sets Python state in every checkpointed attention forward: without this, Dynamo
# runs checkpointed layers eagerly, for every backend, and the checkpointing rows would time eager.
@torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)
def run(quick: bool, device: str, repeats: int, tokens: tuple[int, ...] = (512,), dtype_name: str = "fp32",
        checkpointing: bool = True) -> list[dict]:
    """--quick: a tiny shape, 32 tokens, the training step only (every setting is four more compiles)."""
    shape, r = (QUICK, 8) if quick else (SHAPE, 64)
    tokens, checkpointing = ((32,), False) if quick else (tokens, checkpointing)
    dtype = DTYPES[dtype_name]
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    models = {name: (model.to(device), backend) for name, (model, backend) in _models(shape, r, dtype).items()}
    rows = []
    name = f"Llama {shape.hidden} (int {shape.intermediate}, {shape.heads}/{shape.kv_heads} heads), 1 layer, r={r}"
    for seq in tokens:
        input_ids = torch.randint(0, shape.vocab, (1, seq), generator=torch.Generator().manual_seed(0)).to(device)
        for checkpointed in (False, True) if checkpointing else (False,):
            torch._dynamo.reset()
            for model, _ in models.values():
                model.train()
                if checkpointed:
                    # transformers >= 5.25's names; the old ones warn there.
                    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)(
                        {"use_reentrant": False})
                else:
                    getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
            steps = {contender: _training_step(model, backend, input_ids) for contender, (model, backend) in models.items()}
            first = {contender: step() for contender, step in steps.items()}
            _check("first loss", first[OURS], first[STOCK], tolerance)
            times = interleaved_ms(steps, repeats, warmup=1, device=device)
            memory = {contender: step_peak_mib(step, device, steps=1) for contender, step in steps.items()}
            setting = f"{name}, batch 1x{seq}, {dtype_name}, training" + (", checkpointing" if checkpointed else "")
            rows += _print(_rows(setting, times, memory, models))
        if quick:
            continue
        torch._dynamo.reset()
        for model, _ in models.values():
            model.eval()
        prefills = {contender: _prefill(model, backend, input_ids) for contender, (model, backend) in models.items()}
        _check("prefill logits", prefills[OURS](), prefills[STOCK](), tolerance)
        times = interleaved_ms(prefills, repeats, warmup=1, device=device)
        rows += _print(_rows(f"{name}, batch 1x{seq}, {dtype_name}, prefill", times, None, models))
    return rows
