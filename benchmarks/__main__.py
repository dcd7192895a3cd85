"""`python -m benchmarks [--quick] [--tables ...] [--out BENCHMARKS-run.md]`: every table, one process
per table group, interleaved runs, medians, ratios to the limit, and the targets checked. --out also
writes the rows and the machine as JSON beside the markdown (run.json), which benchmarks.across reads."""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from miss_compile.files import write_text_atomically

from . import compile_time, generation, layer, onnx_runtime, report, scale, training
from .machine import describe

TABLES = ("layer", "training", "compile", "onnx", "mixed", "generation", "scale")

COLUMNS = {
    "scale": (("setting",), ("contender", "ms", "ratio", "vs_stock", "peak_mib", "trainable")),
    "layer": (("dtype", "input", "shape"), ("contender", "ms", "ratio")),
    "training": (("setting",), ("contender", "ms", "ratio", "peak_mib", "trainable")),
    "compile": (("model", "cache", "rounds"), ("contender", "s", "ratio")),
    "onnxruntime": (("provider", "input"), ("contender", "ms", "ratio")),
    "mixed": (("setting",), ("contender", "ms", "ratio")),
    "generation": (("provider", "model", "input"), ("contender", "first_token_ms", "decode_ms", "tokens_per_s", "total_ms", "ratio")),
}


def _run_table(name: str, args: argparse.Namespace) -> list[dict]:
    if name == "layer":
        return layer.run(args.quick, args.device, args.repeats, args.layer_dtypes)
    if name == "training":
        return training.run(args.quick, args.device, args.repeats)
    if name == "compile":
        return compile_time.run(args.quick, args.device, rounds=args.compile_rounds)
    if name == "onnx":
        return onnx_runtime.run(args.quick, args.device, args.repeats)
    if name == "scale":
        return scale.run(args.quick, args.device, args.repeats, tuple(args.scale_tokens), args.scale_dtype)
    if name == "generation":
        return generation.run(args.quick, args.device, args.repeats)
    from . import mixed_adapters

    return mixed_adapters.run(args.quick, args.device, args.repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every table on tiny sizes (the suite runs this)")
    parser.add_argument("--tables", nargs="+", choices=TABLES, default=None,
                        help="default: all; --quick leaves out scale (minutes of compiling even tiny; name it to run it)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per table (default 20, quick 10)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile-rounds", type=int, default=None,
                        help="cold + warm process pairs per compiler (default 3, quick 1)")
    parser.add_argument("--layer-dtypes", nargs="+", choices=list(layer.DTYPES), default=None,
                        help="dtype settings of the layer table (default all; quick fp32)")
    parser.add_argument("--scale-tokens", nargs="+", type=int, default=[512],
                        help="sequence lengths of the 8B-shaped layer table (default 512; quick: 32)")
    parser.add_argument("--scale-dtype", choices=list(scale.DTYPES), default="fp32")
    parser.add_argument("--out", help="also write the markdown report to this file, and its rows to a .json beside it")
    args = parser.parse_args(argv)
    args.tables = args.tables or [name for name in TABLES if not (args.quick and name == "scale")]
    args.repeats = args.repeats or (10 if args.quick else 20)
    args.compile_rounds = args.compile_rounds or (1 if args.quick else 3)
    # Many contenders share forward code objects (nn.Linear, PeftModel): raise Dynamo's per-code
    # limit, and fail loudly rather than silently running a contender eagerly past it.
    limits = {"recompile_limit": 256, "accumulated_recompile_limit": 4096, "fail_on_recompile_limit_hit": True}
    with torch._dynamo.config.patch(limits):
        lines, rows = _run(args)
    if args.out:
        write_text_atomically(args.out, "\n".join(lines))
        results = {"machine": describe(args.device), "device": args.device, "repeats": args.repeats,
                   "quick": args.quick, "rows": rows}
        write_text_atomically(Path(args.out).with_suffix(".json"), json.dumps(results, indent=1))
    return 0


def _run(args: argparse.Namespace) -> tuple[list[str], list[dict]]:
    started = time.perf_counter()
    lines = ["# miss_compile benchmarks" + (" (--quick: tiny sizes, not for claims)" if args.quick else ""), ""]
    lines += [f"- {key}: {value}" for key, value in describe(args.device).items()]
    lines += [f"- device: {args.device}; medians of {args.repeats} interleaved rounds after warm-up", ""]
    print("\n".join(lines), flush=True)
    rows: list[dict] = []
    early = {}
    if args.quick and "compile" in args.tables:
        # The compile-time children are separate processes and the in-process tables leave the second
        # core mostly idle while they compile: --quick (no claims) runs them alongside.
        early["compile"] = ThreadPoolExecutor(max_workers=1).submit(_run_table, "compile", args)
    for name in args.tables:
        table_started = time.perf_counter()
        new_rows = early[name].result() if name in early else _run_table(name, args)
        rows += new_rows
        group_by, columns = COLUMNS[new_rows[0]["table"]]
        text = f"## {name} ({time.perf_counter() - table_started:.0f} s)\n\n" + report.table(new_rows, group_by, columns)
        print(text, flush=True)
        lines.append(text)
    text = "## targets\n\n" + report.targets_table(report.targets(rows) + generation.targets(rows))
    text += f"\n\n(all tables: {time.perf_counter() - started:.0f} s)\n"
    print(text, flush=True)
    lines.append(text)
    return lines, rows


if __name__ == "__main__":
    sys.exit(main())
