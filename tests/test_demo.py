"""The README's main job runs and its numbers agree with the reference."""

import re

from miss_compile.demo import main


def test_demo_prints_small_errors(capsys):
    main(["--batch", "1", "--seq", "8", "--repeats", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"(balance|mini|bat)\s", line)]
    assert [row.split()[0] for row in rows] == ["balance", "mini", "bat"]
    for row in rows:
        layers, params, error = row.split()[1:4]
        assert int(layers) == 14 and int(params) > 0
        assert float(error) < 1e-4
