"""Fine-tune the MiSS blocks of a tiny Llama (built from a config) on synthetic data, under DDP or FSDP2,
compiled with miss_backend.

    torchrun --nproc_per_node=2 examples/train_distributed.py --parallel fsdp2 --out runs/fsdp2
    torchrun --nproc_per_node=2 examples/train_distributed.py --parallel ddp --peft --out runs/ddp
    torchrun --nproc_per_node=2 examples/train_distributed.py --parallel fsdp2 --out runs/more \\
        --resume runs/fsdp2/step-5 --start-step 5          # continue from a saved adapter
    ... --backend nccl --device cuda                       # GPUs (written for them, not yet run on one)

Every step has one global batch (fixed by the step number); rank k trains on its k-th slice, so the
losses and blocks match one process training on the whole batch. Rank 0 writes the adapter in PEFT's
layout (`out/step-N/`, `out/adapter/`) and the per-step losses (`out/losses.json`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from torch import nn

from miss_compile import MissConfig, apply_miss, load_adapter, miss_backend
from miss_compile.distributed import (
    load_adapter_sharded,
    save_adapter_distributed,
    shard_fsdp2,
    trainable_blocks,
    wrap_ddp,
)

# The tests' tiny decoder (tests/conftest.py DECODER): hidden 32, 2 layers.
TINY_LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
ADAPTER = MissConfig(r=4, target_modules="all-linear")


@dataclasses.dataclass
class TrainConfig:
    parallel: str = "fsdp2"    # "ddp" | "fsdp2" | "none" (one process: the reference)
    compile: str = "block"     # "model" (DDP only) | "block" | "none"
    peft: bool = False         # PEFT's MissModel instead of apply_miss
    steps: int = 10
    start_step: int = 0        # with resume: the step the adapter was saved after
    batch: int = 2             # per rank
    micro_batch: int = 0       # > 0: forward/backward in slices of this many rows, gradients accumulated
    seq: int = 16
    lr: float = 0.5            # plain SGD: stateless, so resuming from blocks alone is exact
    seed: int = 0
    device: str = "cpu"
    out: Path | None = None
    save_every: int = 0
    resume: Path | None = None
    resume_sharded: bool = False  # load the resumed adapter into the wrapped model, not before wrapping
    dtype: str = "float32"     # the base model's; blocks stay float32 (PEFT's default)


def build_base(seed: int = 0) -> nn.Module:
    """The same tiny Llama on every rank (seeded): in real use, from_pretrained."""
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA))


def build_model(config: TrainConfig) -> nn.Module:
    """The base model with a fresh adapter, or the adapter saved by an earlier run (resume)."""
    base = build_base(config.seed).to(getattr(torch, config.dtype))
    if config.peft:
        import peft

        if config.resume and not config.resume_sharded:
            model = peft.PeftModel.from_pretrained(base, config.resume, is_trainable=True)
        else:
            model = peft.get_peft_model(base, ADAPTER.to_peft())
    elif config.resume and not config.resume_sharded:
        model = load_adapter(base, config.resume)
    else:
        model = apply_miss(base, ADAPTER)
    return model.to(config.device).train()


def global_batch(step: int, world: int, config: TrainConfig) -> torch.Tensor:
    """[world * batch, seq] token ids: arithmetic sequences mod vocab (learnable), fixed by `step`."""
    generator = torch.Generator().manual_seed(1000 + step)
    rows = world * config.batch
    start = torch.randint(0, TINY_LLAMA["vocab_size"], (rows, 1), generator=generator)
    stride = torch.randint(1, 4, (rows, 1), generator=generator)
    return (start + stride * torch.arange(config.seq)) % TINY_LLAMA["vocab_size"]


def wrap(model: nn.Module, config: TrainConfig) -> nn.Module:
    if config.parallel == "ddp":
        device_ids = [torch.device(config.device).index] if config.device.startswith("cuda") else None
        return wrap_ddp(model, compile=config.compile, device_ids=device_ids)
    if config.parallel == "fsdp2":
        return shard_fsdp2(model, compile=config.compile)
    if config.compile == "model":
        return torch.compile(model, backend="miss")
    if config.compile == "block":
        raise ValueError("compile='block' needs --parallel ddp or fsdp2; use 'model' or 'none' in one process")
    return model


def train(config: TrainConfig) -> tuple[nn.Module, list[float]]:
    """Steps start_step..steps-1; returns the wrapped model and the global (all-rank mean) loss of each step."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if config.parallel != "none" else (0, 1)
    model = build_model(config)
    train_model = wrap(model, config)
    if config.resume and config.resume_sharded:
        load_adapter_sharded(train_model, config.resume)
    optimizer = torch.optim.SGD(trainable_blocks(model), lr=config.lr)  # after wrap: FSDP2 blocks are DTensors
    losses = []
    for step in range(config.start_step, config.steps):
        started = time.perf_counter()
        ids = global_batch(step, world, config).chunk(world)[rank].to(config.device)
        # In slices, the mean of the slices' losses is what DDP/FSDP2 average over ranks of that batch,
        # and each GEMM has a rank's shapes (bf16 kernels round differently at other shapes).
        slices = ids.split(config.micro_batch) if config.micro_batch else (ids,)
        loss = torch.zeros((), device=config.device)
        for part in slices:
            part_loss = train_model(input_ids=part, labels=part, use_cache=False).loss / len(slices)
            part_loss.backward()
            loss = loss + part_loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(_mean_over_ranks(loss, world))
        if rank == 0:
            print(f"step {step + 1:3d}/{config.steps}  loss {losses[-1]:.4f}  {time.perf_counter() - started:6.2f} s",
                  flush=True)
        done = step + 1
        if config.out and ((config.save_every and done % config.save_every == 0) or done == config.steps):
            save_adapter_distributed(model, config.out / ("adapter" if done == config.steps else f"step-{done}"))
    if config.out and rank == 0:
        _write_json(config.out / "losses.json", {"start_step": config.start_step, "losses": losses})
    return train_model, losses


def _mean_over_ranks(loss: torch.Tensor, world: int) -> float:
    if world > 1:
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)  # gloo (torch 2.13) and NCCL both average
    return loss.item()


def _write_json(path: Path, value: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value) + "\n")
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parallel", choices=["ddp", "fsdp2"], default="fsdp2")
    parser.add_argument("--compile", choices=["model", "block", "none"], default=None,
                        help="default: model for DDP, block for FSDP2")
    parser.add_argument("--peft", action="store_true", help="a PEFT MiSS model instead of apply_miss")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--resume", type=Path, help="an adapter folder written by an earlier run")
    parser.add_argument("--start-step", type=int, default=0)
    parser.add_argument("--resume-sharded", action="store_true",
                        help="load the adapter into the wrapped model (load_adapter_sharded), not before wrapping")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the base model's dtype; blocks stay float32")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args(argv)
    if args.resume and not args.start_step:
        parser.error("--resume needs --start-step (the step the adapter was saved after)")
    config = TrainConfig(
        parallel=args.parallel, compile=args.compile or ("model" if args.parallel == "ddp" else "block"),
        peft=args.peft, steps=args.steps, start_step=args.start_step, batch=args.batch, seq=args.seq,
        lr=args.lr, device=args.device, out=args.out, save_every=args.save_every, resume=args.resume,
        resume_sharded=args.resume_sharded, dtype=args.dtype,
    )
    return config, args.backend


def main(argv: list[str] | None = None) -> None:
    config, backend = parse_args(argv)
    dist.init_process_group(backend)
    try:
        if config.device == "cuda":
            local_rank = int(os.environ["LOCAL_RANK"])
            torch.cuda.set_device(local_rank)
            config.device = f"cuda:{local_rank}"
        if dist.get_rank() == 0:
            print(f"{config.parallel} x{dist.get_world_size()} ({backend}, {config.device}), compile={config.compile}, "
                  f"{'PEFT' if config.peft else 'miss_compile'} model, steps {config.start_step}..{config.steps}",
                  flush=True)
        train(config)
        if dist.get_rank() == 0 and config.compile != "none":
            reports = miss_backend.graph_pass.reports
            print(f"miss_backend compiled {len(reports)} graph(s): {sum(len(r.rewritten) for r in reports)} "
                  f"MiSS Linear(s) as miss ops, {sum(len(r.skipped) for r in reports)} left as they were", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
