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
    for section in ("## layer", "## training", "## compile", "## onnx", "## mixed", "## targets"):
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
