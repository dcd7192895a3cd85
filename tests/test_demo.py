"""The README's main job runs as users start it, its numbers agree with the reference, it shows progress
on stderr and nothing else there, and it ends with a verdict (exit 1 when a parity check fails)."""

import os
import re
import subprocess
import sys

import pytest
import torch

from miss_compile import demo

PROGRESS = re.compile(r"^\[\s*\d+\.\d s\] ")


@pytest.fixture(scope="module")
def demo_run():
    """`python -m miss_compile` on one variant (./dev demo runs all three; one keeps CI short)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}  # Python's own filters, as users have them
    return subprocess.run([sys.executable, "-m", "miss_compile", "--batch", "2", "--seq", "8", "--repeats", "1",
                           "--variants", "balance"], capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_demo_prints_small_errors_and_rewrites_every_layer(demo_run):
    assert demo_run.returncode == 0, demo_run.stdout + demo_run.stderr
    compile_table, onnx_table = demo_run.stdout.split("onnxruntime (")
    rows = [line.split() for line in compile_table.splitlines() if re.match(r"(balance|mini|bat)\s", line)]
    assert [row[0] for row in rows] == ["balance"]
    for row in rows:
        layers, as_op, folded = map(int, row[1:4])
        assert layers == as_op == folded == 14
        assert all(float(error) < 1e-4 for error in row[4:7])
        assert all(float(ms) > 0 for ms in row[7:11])
    rows = [line.split() for line in onnx_table.splitlines() if re.match(r"(balance|mini|bat)\s", line)]
    assert [row[0] for row in rows] == ["balance"]
    for row in rows:
        assert all(float(error) < 1e-4 for error in row[1:3])
        assert all(float(ms) > 0 for ms in row[3:6])
    assert demo_run.stdout.rstrip().splitlines()[-1].startswith("verdict: all 7 parity checks passed (balance:")


@pytest.mark.slow
def test_demo_shows_progress_and_no_warnings_on_stderr(demo_run):
    lines = demo_run.stderr.splitlines()
    assert lines, "no progress at all"
    assert [line for line in lines if not PROGRESS.match(line)] == []  # torchvision, LeafSpec, ...: none
    assert lines[0].startswith("[   0.0 s] building a tiny Llama")
    stages = "\n".join(lines)
    for stage in ("compiling the base model", "balance: compiling with miss_backend",
                  "balance: compiling with make_backend(merge=True)", "balance: exporting merged.onnx",
                  "balance: exporting unmerged.onnx", "balance: running onnxruntime"):
        assert stage in stages
    seconds = [float(PROGRESS.match(line).group(0)[1:-2].split()[0]) for line in lines]
    assert seconds == sorted(seconds)


def test_a_failed_parity_check_is_named_in_the_verdict_and_exits_1(monkeypatch, capsys):
    def bad_variant(base, compiled_base, config, input_ids, repeats, progress):
        progress(f"{config.variant}: (stand-in)")
        return {"layers": 14, "rewritten": 14, "folded": 13, "errors": [0.0, 3e-3, 0.0],
                "times": [1.0] * 4, "onnx_errors": [0.0, float("nan")], "onnx_times": [1.0] * 3}

    monkeypatch.setattr(demo, "_run_variant", bad_variant)
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)  # no compile: the rows are stand-ins
    assert demo.main(["--seq", "4", "--variants", "mini"]) == 1
    out, err = capsys.readouterr()
    verdict = out.rstrip().splitlines()[-1]
    assert verdict == ("verdict: FAILED 3 of 7 parity checks: mini compiled error 3.00e-03 > 1e-04; "
                       "mini ONNX unmerged error nan > 1e-04; mini 13/14 layers folded into W")
    assert "mini: (stand-in)" in err
