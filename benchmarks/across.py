"""`python -m benchmarks.across run1.json run2.json ...`: one table of ratios across separate runs.

On a shared machine a whole run can be a few percent off (another tenant, a different compile): the
median over several runs' ratios, with their range, says more than any one run. Reads the JSON rows
that `python -m benchmarks --out run.md` writes beside the markdown (run.json); rows missing from a
run are left out of that row's median.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from .layer import FROZEN_LIMIT

_SETTING_KEYS = ("dtype", "input", "shape", "setting", "model", "cache", "rounds", "provider")


def _setting(row: dict) -> str:
    return ", ".join(str(row[key]) for key in _SETTING_KEYS if key in row)


def read_ratios(rows: list[dict]) -> dict[tuple[str, str, str], float]:
    """(table, setting, contender) -> ratio, from one run's rows (the frozen limit's ratio for merged too)."""
    ratios: dict[tuple[str, str, str], float] = {}
    frozen = {(row["table"], _setting(row)): row["ms"] for row in rows if row["contender"] == FROZEN_LIMIT}
    for row in rows:
        if row.get("ratio") is None:
            continue
        key = (row["table"], _setting(row))
        ratios[(*key, row["contender"])] = row["ratio"]
        if row.get("vs_stock") is not None and row["contender"] == "miss_backend":
            ratios[(*key, "miss_backend / PEFT MiSS compiled")] = row["vs_stock"]
        if row["contender"] == "miss_backend merged" and key in frozen:
            ratios[(*key, "miss_backend merged / frozen limit")] = row["ms"] / frozen[key]
    return ratios


def across(runs: list[list[dict]]) -> str:
    values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for run in runs:
        for key, ratio in read_ratios(run).items():
            values[key].append(ratio)
    lines = [f"ratio to each table's limit: median of {len(runs)} runs (min - max)", ""]
    setting = None
    for (table, group, contender), ratios in values.items():
        if (table, group) != setting:
            setting = (table, group)
            lines += ["", f"**{table}: {group}**", "", "| contender | median ratio | min - max | runs |", "|---|---|---|---|"]
        lines.append(f"| {contender} | {statistics.median(ratios):.3f} | {min(ratios):.3f} - {max(ratios):.3f} "
                     f"| {len(ratios)} |")
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


if __name__ == "__main__":
    print(across([json.loads(Path(path).read_text())["rows"] for path in sys.argv[1:]]))
