"""miss-export: a local transformers model folder + a PEFT MiSS adapter folder -> ONNX.

    miss-export BASE --adapter DIR -o OUT.onnx [--unmerged] [--dtype fp16] [--device cuda]
    miss-export to-lora ADAPTER_DIR --base BASE -o OUT_DIR [--adapter-name NAME | --combine A B ...] [--uniform-rank]

Merged by default (the base model's graph and cost). --unmerged keeps blocks apart as
overridable initializers and also writes OUT.onnx_adapter for the given adapter. `to-lora` writes
a balance / mini adapter as the PEFT LoRA checkpoint that gives the same outputs (for LoRA serving
engines); only BASE's config.json is read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

from miss_compile.checkpoint import load_adapter
from miss_compile.lora import to_lora

from .adapters import write_onnx_adapter
from .inputs import text_inputs
from .onnx import export_onnx
from .runtime import load_session

__all__ = ["main"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class _Progress:
    """One line per long step, with its time: loading, exporting, validating, checking."""

    def __init__(self, steps: int) -> None:
        self.steps, self.done = steps, 0

    def step(self, what: str, work: Callable[[], Any]) -> Any:
        self.done += 1
        print(f"[{self.done}/{self.steps}] {what} ...", flush=True)
        start = time.perf_counter()
        try:
            result = work()
        except BaseException:
            print(f"[{self.done}/{self.steps}] failed", flush=True)
            raise
        print(f"[{self.done}/{self.steps}] done in {time.perf_counter() - start:.1f}s", flush=True)
        return result


def _load_base(folder: Path) -> torch.nn.Module:
    if not (folder / "config.json").is_file():
        raise SystemExit(f"miss-export: {folder} is not a transformers model folder (no config.json)")
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        model_class = transformers.AutoModel
    return model_class.from_pretrained(folder, local_files_only=True).eval()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="miss-export", description=__doc__.splitlines()[0],
        epilog="also: miss-export to-lora ADAPTER_DIR --base BASE -o OUT_DIR writes a balance / mini adapter as an "
               "exact PEFT LoRA folder (see miss-export to-lora --help)")
    parser.add_argument("base", type=Path, help="local transformers model folder (save_pretrained)")
    parser.add_argument("--adapter", type=Path, required=True, help="PEFT-format MiSS adapter folder")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--unmerged", action="store_true", help="keep blocks apart (swappable adapters)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the final check runs")
    parser.add_argument("--seq", type=int, default=8, help="example sequence length for export (>= 2)")
    return parser


def _to_lora_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="miss-export to-lora",
                                     description="a PEFT MiSS adapter folder (balance, mini) -> an exact PEFT LoRA folder")
    parser.add_argument("adapter", type=Path, help="PEFT-format MiSS adapter folder")
    parser.add_argument("--base", type=Path, default=None,
                        help="local transformers model folder of the base model (only config.json is read); "
                             "default: the adapter's base_model_name_or_path when it is a local folder")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the LoRA folder to write")
    parser.add_argument("--adapter-name", default="default",
                        help="adapter to convert: its subfolder of ADAPTER_DIR (PEFT's save_pretrained layout), if any")
    parser.add_argument("--combine", nargs="+", metavar="NAME", default=None,
                        help="sum these adapters (subfolders; 'default' is ADAPTER_DIR itself) into one LoRA")
    parser.add_argument("--uniform-rank", action="store_true",
                        help="pad every layer to the largest rank with zeros (no rank_pattern; exact too)")
    return parser


def _main_to_lora(argv: list[str]) -> int:
    args = _to_lora_parser().parse_args(argv)
    transformers.logging.set_verbosity_error()
    try:
        path = to_lora(args.adapter, args.output, args.adapter_name, combine=args.combine, base_model=args.base,
                       uniform_rank=args.uniform_rank)
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise SystemExit(f"miss-export to-lora: {error}") from None
    config = json.loads((path / "adapter_config.json").read_text())
    print(f"wrote PEFT LoRA {path}: r={config['r']} (lora_alpha=r, scaling 1), {len(config['target_modules'])} "
          f"layers, rank_pattern {config['rank_pattern'] or 'none'}, modules_to_save {config['modules_to_save']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["to-lora"]:
        return _main_to_lora(argv[1:])
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecations a user cannot act on
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    start = time.perf_counter()
    progress = _Progress(steps=4 if args.unmerged else 3)
    model = progress.step(f"loading {args.base} with adapter {args.adapter}",
                          lambda: load_adapter(_load_base(args.base), args.adapter))
    vocab = model.get_input_embeddings().num_embeddings
    input_ids = torch.randint(0, vocab, (2, args.seq), generator=torch.Generator().manual_seed(0))
    kind = "unmerged" if args.unmerged else "merged"
    result = progress.step(
        f"exporting {kind} ONNX and validating on onnxruntime",
        lambda: export_onnx(model, kwargs=text_inputs(model, 2, args.seq), path=args.output,
                            merged=not args.unmerged, dtype=DTYPES[args.dtype]),
    )
    adapter_path = args.output.with_suffix(".onnx_adapter") if args.unmerged else None
    if adapter_path is not None:
        progress.step(f"writing {adapter_path}", lambda: write_onnx_adapter(args.adapter, adapter_path, args.output))
    session = progress.step(f"running once on {args.device}",
                            lambda: _check_run(args.output, args.device, input_ids, adapter_path))
    print(f"summary: {result.path} ({kind}, {args.dtype}), {result.nodes} nodes, {result.bytes / 1e6:.1f} MB, "
          f"max abs error vs torch {result.max_abs_error:.2e}, onnxruntime on {session.device}, "
          f"{time.perf_counter() - start:.1f}s in all")
    return 0


def _check_run(path: Path, device: str, input_ids: torch.Tensor, adapter_path: Path | None) -> Any:
    """One run as a server would do it: with the written adapter file, checked against the graph at load."""
    session = load_session(path, device=device)
    session.run({"input_ids": input_ids}, adapter=adapter_path)
    return session


if __name__ == "__main__":
    sys.exit(main())
