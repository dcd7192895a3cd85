"""`python -m benchmarks --quick` runs every table, so the benchmarks can't rot between releases.

Timings on tiny sizes mean nothing; what is asserted is that every table and contender ran, that
the parity checks inside the benchmarks held (they raise otherwise), and that targets were checked.
"""

import json
import re

import pytest

from benchmarks.__main__ import main
from benchmarks.across import across

pytestmark = pytest.mark.slow


def test_quick_run_fills_every_table(tmp_path):
    out = tmp_path / "quick.md"
    assert main(["--quick", "--repeats", "3", "--out", str(out)]) == 0
    text = out.read_text()
    for section in ("## layer", "## training", "## compile", "## onnx", "## mixed", "## generation", "## targets"):
        assert section in text
    for contender in ("limit: compiled base", "miss_backend merged", "PEFT MiSS eager", "PEFT LoRA r=8 compiled",
                      "bat: miss_backend", "mini: miss_backend", "limit: compiled base, frozen",
                      "floor for bat: limit + weight grads",
                      "onnxruntime unmerged", "torch eager (PEFT MiSS)"):
        assert f"| {contender} |" in text
    times = [float(ms) for ms in re.findall(r"^\| [^|]+ \| ([0-9.]+) \|", text, flags=re.MULTILINE)]
    assert len(times) > 30 and all(ms > 0 for ms in times)
    targets = text.split("## targets")[1]
    assert targets.count("| yes |") + targets.count("| **no** |") >= 10
    # the same run's JSON rows twice: every row's median is its one ratio, over 2 runs
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert {row["table"] for row in rows} >= {"layer", "training", "compile", "onnxruntime", "mixed"}
    generation = {(row["model"], row["contender"].removesuffix(" (CPU)")) for row in rows if row["table"] == "generation"}
    assert {contender for model, contender in generation if model == "Llama 64 x 1 layer, r=8"} == {
        "torch eager PEFT generate", "onnxruntime merged, with past", "onnxruntime unmerged, with past",
        "onnxruntime unmerged, without past", "onnxruntime-genai merged", "onnxruntime-genai unmerged, adapter file"}
    assert {contender for model, contender in generation if model == "Llama 128 x 1 layer, r=8"} == {
        "onnxruntime merged, with past", "onnxruntime unmerged, with past"}  # the scale setting's tiny twin
    assert targets.count("generation unmerged vs merged decode per token") == 3  # quick: batch 1, 4; scale: 2
    assert "byte floor 1.0" in targets
    summary = across([rows, rows])
    ours = re.search(r"^\| miss_backend \| ([0-9.]+) \| ([0-9.]+) - ([0-9.]+) \| 2 \|$", summary, flags=re.MULTILINE)
    assert ours and ours.group(1) == ours.group(2) == ours.group(3)
    assert "| miss_backend merged / frozen limit |" in summary


def test_quick_scale_table_checks_its_targets(tmp_path):
    """The 8B-shaped layer table (left out of the default --quick) on its tiny shape."""
    out = tmp_path / "scale.md"
    assert main(["--quick", "--tables", "scale", "--repeats", "2", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert {row["contender"] for row in rows} == {"limit: compiled layer, frozen", "miss_backend", "PEFT MiSS compiled",
                                                  "PEFT LoRA r=4 compiled"}
    assert all(row["ms"] > 0 and row["peak_mib"] > 0 for row in rows)
    assert "| miss_backend / PEFT MiSS compiled |" in across([rows])
    assert out.read_text().split("## targets")[1].count("8B-shaped layer") == 4


def test_byte_floor_of_the_generation_models():
    """Blocks over the weights a decoded token reads, by hand: projections and LM head (vocab 1024)."""
    from benchmarks import scale
    from benchmarks.generation import byte_floor
    from benchmarks.training import FULL

    weights = 4 * (4 * 512 * 512 + 3 * 512 * 1408) + 512 * 1024  # hidden 512 (int 1408), 4 layers
    blocks = 4 * 64 * (4 * 512 + 2 * 1408 + 512)
    assert byte_floor(FULL, 64) == pytest.approx(1 + blocks / weights)
    weights = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 4096 * 1024  # 8 of 32 heads for k, v
    blocks = 64 * (2 * 4096 + 2 * 1024 + 2 * 14336 + 4096)  # out: q o, k v, gate up, down
    assert byte_floor(scale.SHAPE, 64) == pytest.approx(1 + blocks / weights)


def test_onnx_forms_are_exact_and_timed():
    """Issue 18's alternative unmerged graph forms, each checked against torch inside the run (it raises)."""
    from benchmarks import onnx_forms
    from benchmarks.training import QUICK

    rows = onnx_forms.run(QUICK, 8, {"batch 2 x 32": (2, 32), "batch 1 x 1": (1, 1)}, repeats=1)
    assert {row["form"] for row in rows} == {"merged", *onnx_forms.FORMS}
    assert len(rows) == 2 * (1 + len(onnx_forms.FORMS)) and all(row["ms"] > 0 for row in rows)
    # r * sum(out) / sum(in * out) over q k v o gate up down of the 8B shape (KV width 1024)
    outs, macs = 4096 * 3 + 1024 * 2 + 14336 * 2, 4096 * (4096 * 2 + 1024 * 2 + 14336 * 2) + 14336 * 4096
    assert onnx_forms.floor(onnx_forms.SHAPES["8b"], 64) == pytest.approx(64 * outs / macs)
