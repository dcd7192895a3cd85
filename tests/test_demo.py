"""The README's main job runs, and its numbers agree with the reference."""

import re

import pytest

from miss_compile.demo import main

pytestmark = pytest.mark.slow


def test_demo_prints_small_errors_and_rewrites_every_layer(capsys):
    main(["--batch", "2", "--seq", "8", "--repeats", "1", "--variants", "balance"])
    out = capsys.readouterr().out
    compile_table, onnx_table = out.split("onnxruntime (")
    rows = [line.split() for line in compile_table.splitlines() if re.match(r"(balance|mini|bat)\s", line)]
    assert [row[0] for row in rows] == ["balance"]  # ./dev demo runs all three; one keeps CI short
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
