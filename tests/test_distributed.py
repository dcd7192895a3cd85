"""DDP and FSDP2 around MiSS models compiled with miss_backend: 2 processes (torchrun, gloo, CPU) give the
losses and final blocks of one process training eagerly on the whole batch; their adapters load in PEFT."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from distributed_worker import STEPS, eval_ids, phases
from helpers import build, model_output
from train_distributed import TrainConfig, build_base, train  # examples/: on sys.path by distributed_worker

from miss_compile import MissConfig, apply_miss, read_adapter, save_adapter
from miss_compile.distributed import load_adapter_sharded, shard_fsdp2, wrap_ddp

pytestmark = pytest.mark.xdist_group("distributed")  # one worker where xdist can group; _once() everywhere

WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT_S = 600  # a cold Inductor cache on a busy 2-core machine; a hang fails here, not in CI's timeout
PHASES = list(phases(Path()))
# bf16: only the frozen base computes in bf16, row by row as in one process; blocks, their gradients and
# the loss are fp32. Seen here: 5e-7 (losses), 7e-8 (blocks).
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-3}


def _once(tmp_path_factory, name, make):
    """A folder `make(folder)` fills once per test session, even across pytest-xdist workers (they share
    basetemp's parent). xdist_group alone does not keep this module on one worker: pytest 9.2 ignores
    the node id suffix xdist 3.8 groups by."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / "done").touch()
    return folder


def _launch(out):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Own process group, so a timeout kills torchrun's workers too, not only torchrun.
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun ran past {TIMEOUT_S} s:\n{stdout[-3000:]}\n{stderr[-6000:]}")
    assert process.returncode == 0, f"torchrun failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _once(tmp_path_factory, "distributed_runs", _launch)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """dtype -> one process, eager, the whole global batch (2 ranks x 2 sequences) each step, run in the
    ranks' slices with gradients accumulated: the same math, and GEMMs of the ranks' shapes (bf16 GEMMs on
    AMX machines round differently at batch 4 than at 2: 6e-3 in the loss after 8 steps)."""
    def make(folder):
        for dtype in TOLERANCE:
            train(TrainConfig(parallel="none", compile="none", batch=4, micro_batch=2, steps=STEPS, dtype=dtype,
                              out=folder / dtype))

    folder = _once(tmp_path_factory, "distributed_reference", make)
    return {dtype: (json.loads((folder / dtype / "losses.json").read_text())["losses"], folder / dtype / "adapter")
            for dtype in TOLERANCE}



@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_reference_trains(reference, dtype):
    losses, adapter = reference[dtype]
    _, blocks = read_adapter(adapter)
    assert len(blocks) == 14  # 7 Linears x 2 layers
    assert all(block.abs().max() > 1e-3 for block in blocks.values())  # zero-initialized, then trained
    assert len(losses) == STEPS and len(set(losses)) == STEPS


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
def test_losses_and_blocks_match_one_process(runs, reference, phase):
    config = phases(runs)[phase]
    expected_losses, expected_adapter = reference[config.dtype]
    tolerance = TOLERANCE[config.dtype]
    saved = json.loads((runs / phase / "losses.json").read_text())
    start = saved["start_step"]
    assert start == config.start_step
    torch.testing.assert_close(saved["losses"], expected_losses[start:], rtol=tolerance, atol=tolerance)
    config, blocks = read_adapter(runs / phase / "adapter")
    expected_config, expected_blocks = read_adapter(expected_adapter)
    assert config == expected_config
    assert blocks.keys() == expected_blocks.keys()
    for name, block in blocks.items():
        assert block.dtype == torch.float32
        torch.testing.assert_close(block, expected_blocks[name], rtol=tolerance, atol=tolerance)
    assert not list((runs / phase / "adapter").glob(".*"))  # no temp files left behind


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["ddp", "fsdp2_peft"])
def test_every_adapted_linear_ran_as_a_miss_op(runs, phase):
    reports = json.loads((runs / phase / "reports.json").read_text())
    # Per-block compiles: the first block's input needs no grad, the second's does (two graphs).
    assert len(reports) == 2
    source = "peft pattern" if phase == "fsdp2_peft" else "miss op"
    for report in reports:
        assert report == {"rewritten": [source] * 7, "skipped": []}


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["ddp", "fsdp2", "fsdp2_peft"])
def test_saved_adapter_loads_in_peft(runs, phase):
    """PEFT, from the saved folder, gives the logits of the trained (wrapped, compiled) model on rank 0."""
    theirs = peft.PeftModel.from_pretrained(build_base(), runs / phase / "adapter").eval()
    ids = eval_ids(phases(runs)[phase], world=2)[0]
    with torch.no_grad():
        logits = model_output(theirs, ids)
    torch.testing.assert_close(logits, torch.load(runs / phase / "logits.pt"), rtol=1e-5, atol=1e-5)


# --- refusals, before any process group is needed


def test_a_failed_save_on_rank_0_raises_on_every_rank(runs):
    rank0 = (runs / "save_failure_rank0.txt").read_text()
    rank1 = (runs / "save_failure_rank1.txt").read_text()
    assert rank0.startswith("NotADirectoryError: cannot save the adapter to"), rank0
    assert rank1.startswith("RuntimeError: rank 0 could not save adapter 'default'"), rank1
    assert "NotADirectoryError" in rank1


def test_a_trainable_base_weight_is_named():
    model = apply_miss(build("llama"), MissConfig(r=4, target_modules=["q_proj"]))
    model.model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"not MiSS blocks: \['model.norm.weight'\]; freeze them"):
        wrap_ddp(model)


def test_fsdp2_refuses_whole_model_compile():
    model = apply_miss(build("llama"), MissConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="compile per block"):
        shard_fsdp2(model, compile="model")


def test_sharded_load_needs_the_adapter_in_place(tmp_path):
    save_adapter(apply_miss(build("llama"), MissConfig(r=4, target_modules=["q_proj"])), tmp_path)
    with pytest.raises(ValueError, match="load_adapter .or PeftModel.from_pretrained. before wrapping"):
        load_adapter_sharded(build("llama"), tmp_path)


def test_sharded_load_checks_like_load_adapter(tmp_path):
    save_adapter(apply_miss(build("llama"), MissConfig(r=4, target_modules=["q_proj"])), tmp_path)
    other = apply_miss(build("llama"), MissConfig(r=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"shape \(4, 32\) in the file, \(8, 32\) in the model"):
        load_adapter_sharded(other, tmp_path)


def test_sharded_load_refuses_non_finite_blocks_when_asked(tmp_path):
    source = apply_miss(build("llama"), MissConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        next(iter(source.model.layers[0].self_attn.q_proj.miss_block.values()))[0, 0] = float("nan")
    save_adapter(source, tmp_path)
    target = apply_miss(build("llama"), MissConfig(r=4, target_modules=["q_proj"]))
    before = [p.detach().clone() for p in target.parameters()]
    with pytest.raises(ValueError, match=r"NaN or Inf"):
        load_adapter_sharded(target, tmp_path, check_finite=True)
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters(), strict=True))
