"""Run by test_distributed.py under `torchrun --nproc_per_node=2`: every phase in the same two processes,
so start-up, imports and compiled blocks are paid once. Writes each phase's losses and adapter under OUT.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed_worker.py OUT
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from miss_compile import miss_backend
from miss_compile.distributed import save_adapter_distributed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from train_distributed import TrainConfig, global_batch, train  # noqa: E402

STEPS = 10
SAVED_AT = 5  # the fsdp2 phase also saves after this step; the resume phase starts from it


def phases(out: Path) -> dict[str, TrainConfig]:
    """Name -> run. Blocks compiled one by one everywhere, so the runs of one model class share their
    compiled graphs (Inductor compiles a decoder block once for ours, once for PEFT's)."""
    base = TrainConfig(steps=STEPS, compile="block")
    return {
        "ddp": dataclasses.replace(base, parallel="ddp", out=out / "ddp"),
        "fsdp2": dataclasses.replace(base, parallel="fsdp2", out=out / "fsdp2", save_every=SAVED_AT),
        "fsdp2_resumed": dataclasses.replace(
            base, parallel="fsdp2", out=out / "fsdp2_resumed",
            resume=out / "fsdp2" / f"step-{SAVED_AT}", start_step=SAVED_AT,
        ),
        "fsdp2_peft": dataclasses.replace(base, parallel="fsdp2", peft=True, out=out / "fsdp2_peft"),
        # PEFT's model, sharded, then our step-5 adapter loaded into its shards (load_adapter_sharded).
        "fsdp2_peft_resumed_sharded": dataclasses.replace(
            base, parallel="fsdp2", peft=True, out=out / "fsdp2_peft_resumed_sharded",
            resume=out / "fsdp2" / f"step-{SAVED_AT}", start_step=SAVED_AT, resume_sharded=True,
        ),
        # A bf16 base with fp32 blocks (PEFT's default): FSDP2 all-gathers both dtypes. Eager, to pay
        # for no bf16 compile here (compiled bf16 is tested in one process elsewhere).
        "fsdp2_bf16": dataclasses.replace(
            base, parallel="fsdp2", compile="none", dtype="bfloat16", out=out / "fsdp2_bf16",
        ),
    }


def eval_ids(config: TrainConfig, world: int) -> tuple[torch.Tensor, ...]:
    """Each rank's slice of a batch no step trained on."""
    return global_batch(STEPS, world, config).chunk(world)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    try:
        for name, config in phases(out).items():
            if dist.get_rank() == 0:
                print(f"--- {name}", flush=True)
            seen = len(miss_backend.graph_pass.reports)
            train_model, _ = train(config)
            # The trained (wrapped, compiled) model's logits, for the PEFT check. Same shapes and grad
            # mode as training, so the compiled blocks are reused as they are.
            rank, world = dist.get_rank(), dist.get_world_size()
            logits = train_model(input_ids=eval_ids(config, world)[rank], use_cache=False).logits
            if rank == 0:
                torch.save(logits.detach(), config.out / "logits.pt")  # what the pass did in the graphs this phase compiled (none: reused)
                reports = miss_backend.graph_pass.reports[seen:]
                rows = [{"rewritten": [item.source for item in report.rewritten], "skipped": report.skipped}
                        for report in reports]
                (config.out / "reports.json").write_text(json.dumps(rows) + "\n")
        _save_that_fails(train_model, out)
    finally:
        dist.destroy_process_group()


def _save_that_fails(model: torch.nn.Module, out: Path) -> None:
    """Rank 0 cannot write (the folder is a file): every rank must raise at once, none wait at a barrier."""
    target = out / "a_file_not_a_folder"
    if dist.get_rank() == 0:
        target.write_text("")
    try:
        save_adapter_distributed(model, target)
        outcome = "saved"
    except Exception as error:  # what each rank saw, for the test to read
        outcome = f"{type(error).__name__}: {error}"
    (out / f"save_failure_rank{dist.get_rank()}.txt").write_text(outcome)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
