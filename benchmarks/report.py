"""Markdown tables of the rows the benchmarks return, and the targets checked against them."""

from __future__ import annotations

from collections import defaultdict

from .layer import FROZEN_LIMIT


def _fmt(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def table(rows: list[dict], group_by: tuple[str, ...], columns: tuple[str, ...]) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[key] for key in group_by)].append(row)
    parts = []
    for key, members in groups.items():
        parts.append("**" + ", ".join(str(k) for k in key) + "**\n")
        parts.append("| " + " | ".join(columns) + " |")
        parts.append("|" + "---|" * len(columns))
        parts += ["| " + " | ".join(_fmt(row.get(column)) for column in columns) + " |" for row in members]
        parts.append("")
    return "\n".join(parts)


def _find(rows: list[dict], **match: object) -> dict:
    found = [row for row in rows if all(row.get(k) == v for k, v in match.items())]
    if len(found) != 1:
        raise KeyError(f"expected one row matching {match}, found {len(found)}")
    return found[0]


def targets(rows: list[dict]) -> list[tuple[str, float, str, bool]]:
    """(what, measured, goal, met) for every target of the benchmarks issue the rows cover."""
    checks: list[tuple[str, float, str, bool]] = []
    layer = [row for row in rows if row["table"] == "layer"]
    for row in layer:
        where = f"{row['dtype']}, {row['input']}"
        if row["contender"] == "miss_backend":
            goal = 1.05 if row["input"].startswith("prefill") else 1.15
            checks.append((f"layer unmerged vs limit ({where})", row["ratio"], f"<= {goal}", row["ratio"] <= goal))
        if row["contender"] == "miss_backend merged":
            frozen = _find(layer, dtype=row["dtype"], input=row["input"], contender=FROZEN_LIMIT)
            ratio = row["ms"] / frozen["ms"]
            checks.append((f"layer merged vs limit compiled under freezing too ({where})", ratio, "<= 1.01",
                           ratio <= 1.01))
    training = [row for row in rows if row["table"] == "training"]
    if training:
        ours, peft_compiled = _find(training, contender="miss_backend"), _find(training, contender="PEFT MiSS compiled")
        lora = next(row for row in training if row["contender"].startswith("PEFT LoRA"))
        checks.append(("training step vs limit", ours["ratio"], "<= 1.06", ours["ratio"] <= 1.06))
        speedup = peft_compiled["ms"] / ours["ms"]
        checks.append(("training speed-up over torch.compile(PEFT MiSS)", speedup, ">= 1.09", speedup >= 1.09))
        checks.append(("training speed-up over compiled LoRA", lora["ms"] / ours["ms"], "> 1", ours["ms"] < lora["ms"]))
        lowest = min(peft_compiled["peak_mib"], lora["peak_mib"])
        checks.append(("training peak MiB vs compiled PEFT MiSS and LoRA", ours["peak_mib"], f"<= {lowest:.1f}",
                       ours["peak_mib"] <= lowest))
        bat, bat_peft = _find(training, contender="bat: miss_backend"), _find(training, contender="bat: PEFT compiled")
        checks.append(("bat training speed-up over torch.compile(PEFT bat)", bat_peft["ms"] / bat["ms"], ">= 1.3",
                       bat_peft["ms"] / bat["ms"] >= 1.3))
        checks.append(("bat training peak MiB vs PEFT bat compiled", bat["peak_mib"],
                       f"< {bat_peft['peak_mib']:.1f}", bat["peak_mib"] < bat_peft["peak_mib"]))
    checks += _scale_targets([row for row in rows if row["table"] == "scale"])
    for row in rows:
        if row["table"] == "onnxruntime" and row["contender"] == "onnxruntime unmerged":
            checks.append((f"onnxruntime unmerged vs merged ({row['input']})", row["ratio"], "<= 1.05",
                           row["ratio"] <= 1.05))
        if row["table"] == "onnxruntime" and row["contender"].startswith("torch eager"):
            merged_over_eager = 1 / row["ratio"]
            checks.append((f"onnxruntime merged vs torch eager ({row['input']})", merged_over_eager, "<= 1",
                           merged_over_eager <= 1))
        if row["table"] == "compile" and row["contender"] == "miss_backend":
            checks.append((f"compile time vs stock Inductor ({row['cache']})", row["ratio"], "<= 1.2",
                           row["ratio"] <= 1.2))
    return checks


def targets_table(checks: list[tuple[str, float, str, bool]]) -> str:
    lines = ["| target | measured | goal | met |", "|---|---|---|---|"]
    lines += [f"| {what} | {value:.3f} | {goal} | {'yes' if met else '**no**'} |" for what, value, goal, met in checks]
    return "\n".join(lines)


def _scale_targets(rows: list[dict]) -> list[tuple[str, float, str, bool]]:
    """The 8B-shaped layer's training steps: <= 1.02x the limit, faster than stock and LoRA, no higher peak."""
    checks: list[tuple[str, float, str, bool]] = []
    for setting in dict.fromkeys(row["setting"] for row in rows if row["setting"].endswith(("training", "checkpointing"))):
        where = setting.split(", batch ")[1]
        ours, stock = _find(rows, setting=setting, contender="miss_backend"), _find(rows, setting=setting,
                                                                                     contender="PEFT MiSS compiled")
        lora = next(row for row in rows if row["setting"] == setting and row["contender"].startswith("PEFT LoRA"))
        checks.append((f"8B-shaped layer vs limit ({where})", ours["ratio"], "<= 1.02", ours["ratio"] <= 1.02))
        checks.append((f"8B-shaped layer vs torch.compile(PEFT MiSS) ({where})", ours["vs_stock"], "< 1",
                       ours["vs_stock"] < 1))
        checks.append((f"8B-shaped layer vs compiled LoRA ({where})", ours["ms"] / lora["ms"], "< 1", ours["ms"] < lora["ms"]))
        checks.append((f"8B-shaped layer peak MiB vs torch.compile(PEFT MiSS) ({where})", ours["peak_mib"],
                       f"<= {stock['peak_mib']:.1f}", ours["peak_mib"] <= stock["peak_mib"]))
    return checks
