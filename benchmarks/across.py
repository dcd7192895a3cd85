"""`python -m benchmarks.across run1.md run2.md ...`: one table of ratios across separate runs.

On a shared machine a whole run can be a few percent off (another tenant, a different compile): the
median over several runs' ratios, with their range, says more than any one run. Reads the markdown
that `python -m benchmarks --out` writes; rows missing from a run are left out of that row's median.
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

from .layer import FROZEN_LIMIT


def read_ratios(text: str) -> dict[tuple[str, str, str], float]:
    """(table, setting, contender) -> ratio, from one report."""
    ratios: dict[tuple[str, str, str], float] = {}
    ms: dict[str, float] = {}  # contender -> ms, of the table being read
    table = setting = ""
    columns: list[str] = []
    for line in text.splitlines():
        if line.startswith("## "):
            table = line[3:].split(" (")[0]
        elif line.startswith("**") and line.endswith("**"):
            setting = line.strip("*")
        elif line.startswith("| ") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if cells[0] in ("contender", "target"):
                columns, ms = cells, {}
            elif "ratio" in columns and table != "targets":
                ratios[(table, setting, cells[0])] = float(cells[columns.index("ratio")])
                if "ms" in columns:
                    ms[cells[0]] = float(cells[columns.index("ms")])
                if cells[0] == "miss_backend merged" and FROZEN_LIMIT in ms:  # the frozen limit comes first
                    ratios[(table, setting, "miss_backend merged / frozen limit")] = ms[cells[0]] / ms[FROZEN_LIMIT]
    return ratios


def across(texts: list[str]) -> str:
    runs = [read_ratios(text) for text in texts]
    values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for run in runs:
        for key, ratio in run.items():
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
    print(across([Path(path).read_text() for path in sys.argv[1:]]))
