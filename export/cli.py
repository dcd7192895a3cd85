"""miss-export: a local transformers model folder (+ a PEFT MiSS adapter folder) -> ONNX.

    miss-export BASE [--adapter DIR] -o OUT.onnx [--unmerged] [--dtype fp16] [--device cuda]
    miss-export inspect PATH...
    miss-export to-lora ADAPTER_DIR --base BASE -o OUT_DIR [--adapter-name NAME | --combine A B ...] [--uniform-rank]

Merged by default (the base model's graph and cost). --unmerged keeps blocks apart as
overridable initializers and also writes OUT.onnx_adapter for the given adapter. `inspect`
describes an adapter folder, an .onnx or an .onnx_adapter. `to-lora` writes a balance / mini
adapter as the PEFT LoRA checkpoint that gives the same outputs (for LoRA serving engines); only
BASE's config.json is read.

Exit status: 0 done; 2 a usage mistake or input the command cannot take (the message says which
and how to fix it); 1 the work failed otherwise (onnxruntime, a bug). Errors print one message,
the traceback only with --debug; like argparse, `main` reports an error by raising SystemExit.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

from miss_compile.checkpoint import load_adapter, read_checkpoint
from miss_compile.lora import to_lora
from miss_compile.quiet import quiet_library_noise

from .adapters import write_onnx_adapter
from .genai import export_genai_folder
from .inputs import text_inputs
from .inspection import describe
from .onnx import export_onnx
from .runtime import load_session

__all__ = ["main", "EXIT_FAILED", "EXIT_USAGE"]

EXIT_FAILED, EXIT_USAGE = 1, 2
# Errors whose message is the whole story (they name what is wrong and the fix): exit 2.
USER_ERRORS = (ValueError, TypeError, NotImplementedError, OSError)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
BF16_REFUSAL = (
    "--dtype bf16: every export is validated on onnxruntime's CPU provider, which has no bf16 kernels "
    "(the graph's Mul fails with NOT_IMPLEMENTED); use --dtype fp16 (onnxruntime runs it on the CPU and "
    "on CUDA, --device cuda) or fp32")

EXPORT_EXAMPLES = """examples:
  miss-export ./llama --adapter ./my-miss-adapter -o model.onnx             # merged: the base model's cost
  miss-export ./llama --adapter ./my-miss-adapter -o base.onnx --unmerged   # + base.onnx_adapter, swappable
  miss-export ./llama -o llama.onnx                                         # the base model alone
  miss-export inspect base.onnx                                             # what a file holds

other commands: miss-export inspect --help, miss-export to-lora --help"""


class _Exit(SystemExit):
    """An error already printed; exits with `status`. Its str is the message (what callers match on)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(status)
        self.message = message

    def __str__(self) -> str:
        return self.message


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


def _version() -> str:
    try:
        return importlib.metadata.version("miss-compile")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (miss-compile is not installed; run from a checkout)"


def _common() -> argparse.ArgumentParser:
    """Options every command takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="print the full traceback when something fails")
    common.add_argument("--version", action="version", version=f"miss-export (miss-compile) {_version()}")
    return common


def _at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"{value} is too small: the example sizes must be >= 2 (torch.export fixes a size of 1 into the "
            "graph, which would then take only that size); the exported graph takes any size anyway")
    return value


def _export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="miss-export", description=__doc__.splitlines()[0], parents=[_common()], epilog=EXPORT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, metavar="BASE",
                        help="local transformers model folder (what save_pretrained writes: config.json and weights)")
    parser.add_argument("--adapter", type=Path, default=None, metavar="DIR",
                        help="PEFT-format MiSS adapter folder (adapter_config.json + weights; ours or PEFT's); "
                             "without it the base model alone is exported")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.onnx",
                        help="the .onnx file to write (weights past 2 GB go to OUT.onnx.data beside it)")
    parser.add_argument("--unmerged", action="store_true",
                        help="keep the MiSS blocks apart as overridable graph inputs and write OUT.onnx_adapter too, "
                             "so other adapters can be swapped in per run; default: merged into the weights "
                             "(the base model's graph and speed)")
    parser.add_argument("--adapter-name", default="default", metavar="NAME",
                        help="the adapter name the graph's blocks carry (<layer>.miss_block.NAME; default 'default'); "
                             "an .onnx_adapter must be written for the same name: write_onnx_adapter(..., as_name=NAME)")
    parser.add_argument("--dtype", choices=[*DTYPES, "bf16"], default="fp32",
                        help="weights and activations of the graph (default fp32); bf16 is refused: onnxruntime's "
                             "CPU provider, which validates every export, cannot run it")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                        help="where the final onnxruntime check runs (default cpu; auto: CUDA when it can start)")
    parser.add_argument("--batch", type=_at_least_two, default=2,
                        help="batch size of the example inputs the export traces and validates with (>= 2; default 2)")
    parser.add_argument("--seq", type=_at_least_two, default=8,
                        help="sequence length of the example inputs (>= 2; default 8)")
    parser.add_argument("--task", choices=["text-generation-with-past"], default=None,
                        help="text-generation-with-past: OUT is a folder for onnxruntime-genai (KV-cache model.onnx, "
                             "genai_config.json, BASE's tokenizer files; --unmerged adds adapters/NAME.onnx_adapter)")
    return parser


def _inspect_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="miss-export inspect", parents=[_common()],
        description="describe an adapter folder (ours or PEFT's), an .onnx or an .onnx_adapter: variant, ranks, "
                    "layers, dtypes, sizes; for graphs merged or unmerged and which blocks are overridable",
        epilog="example: miss-export inspect ./my-miss-adapter base.onnx base.onnx_adapter")
    parser.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="files or adapter folders to describe")
    return parser


def _to_lora_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="miss-export to-lora", parents=[_common()],
        description="a PEFT MiSS adapter folder (balance, mini) -> an exact PEFT LoRA folder",
        epilog="example: miss-export to-lora ./my-miss-adapter --base ./llama -o ./my-lora-adapter")
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


def _check_folders(base: Path, adapter: Path | None) -> None:
    """The folder mix-ups, named before anything loads."""
    if not base.is_dir():
        raise FileNotFoundError(f"BASE {base} is not a folder; pass the transformers model folder (config.json)")
    if (base / "adapter_config.json").is_file() and not (base / "config.json").is_file():
        raise ValueError(f"BASE {base} is an adapter folder (adapter_config.json); pass the model folder it was "
                         f"trained on as BASE and this folder as --adapter {base}")
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"BASE {base} is not a transformers model folder (no config.json)")
    if adapter is None:
        return
    if not adapter.is_dir():
        raise FileNotFoundError(f"--adapter {adapter} is not a folder; pass the adapter folder (adapter_config.json)")
    if (adapter / "config.json").is_file() and not (adapter / "adapter_config.json").is_file():
        raise ValueError(f"--adapter {adapter} is a transformers model folder (config.json), not an adapter folder "
                         "(adapter_config.json); pass the folder PEFT's save_pretrained or miss_compile.save_adapter wrote")


def _refuse_saved_modules(adapter: Path) -> None:
    """--unmerged swaps adapters as block files: an adapter that trains whole modules cannot be one."""
    checkpoint = read_checkpoint(adapter)
    if checkpoint.saved:
        raise ValueError(
            f"--unmerged: the adapter in {adapter} trains whole modules too (modules_to_save "
            f"{checkpoint.config.modules_to_save}), which an .onnx_adapter cannot carry (it holds MiSS blocks only, "
            "so a swapped-in adapter would run with these modules): drop --unmerged to export it merged")


def _load_base(folder: Path) -> torch.nn.Module:
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        model_class = transformers.AutoModel
    return model_class.from_pretrained(folder, local_files_only=True).eval()


def _example_inputs(model: torch.nn.Module, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """What the export traces and validates with (the graph takes any batch and sequence): input_ids, and
    attention_mask / token_type_ids where the model takes them, so padded batches run as in torch."""
    return text_inputs(model, batch, seq)


def _written(path: Path) -> list[Path]:
    """`path` and the external-data file an export writes beside it past 2 GB."""
    return [path, *sorted(path.parent.glob(path.name + ".data"))]


def _main_export(args: argparse.Namespace) -> int:
    if args.dtype == "bf16":
        raise ValueError(BF16_REFUSAL)
    if args.unmerged and args.adapter is None:
        raise ValueError("--unmerged keeps MiSS blocks apart, and without --adapter there are none: "
                         "pass --adapter DIR, or drop --unmerged to export the base model alone")
    _check_folders(args.base, args.adapter)
    if args.unmerged:
        _refuse_saved_modules(args.adapter)
    start = time.perf_counter()
    adapter_path = args.output.with_suffix(".onnx_adapter") if args.unmerged else None
    progress = _Progress(steps=2 if args.task else 3 + (adapter_path is not None))
    if args.adapter is None:
        model = progress.step(f"loading {args.base} (no adapter)", lambda: _load_base(args.base))
    else:
        model = progress.step(f"loading {args.base} with adapter {args.adapter}",
                              lambda: load_adapter(_load_base(args.base), args.adapter, args.adapter_name))
    if args.task == "text-generation-with-past":
        folder = progress.step(f"writing the onnxruntime-genai folder {args.output}", lambda: export_genai_folder(
            model, args.output, merged=not args.unmerged, tokenizer_from=args.base, dtype=DTYPES[args.dtype]))
        print(f"summary: {folder}, {time.perf_counter() - start:.1f}s in all")
        return 0
    inputs = _example_inputs(model, args.batch, args.seq)
    kind = "unmerged" if args.unmerged else "merged" if args.adapter is not None else "base model"
    result = progress.step(
        f"exporting {kind} ONNX and validating on onnxruntime",
        lambda: export_onnx(model, kwargs=inputs, path=args.output, merged=not args.unmerged,
                            dtype=DTYPES[args.dtype]),
    )
    if adapter_path is not None:
        progress.step(f"writing {adapter_path}", lambda: write_onnx_adapter(args.adapter, adapter_path, args.output,
                                                                           as_name=args.adapter_name))
    session = progress.step(f"running once on {args.device}",
                            lambda: _check_run(args.output, args.device, inputs, adapter_path))
    print(f"summary: {result.path} ({kind}, {args.dtype}), {result.nodes} nodes, {result.bytes / 1e6:.1f} MB, "
          f"max abs error vs torch {result.max_abs_error:.2e}, onnxruntime on {session.device}, "
          f"{time.perf_counter() - start:.1f}s in all")
    for path in [*_written(args.output), *([adapter_path] if adapter_path is not None else [])]:
        print(f"  wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def _check_run(path: Path, device: str, inputs: dict[str, torch.Tensor], adapter_path: Path | None) -> Any:
    """One run as a server would do it: with the written adapter file, checked against the graph at load."""
    session = load_session(path, device=device)
    session.run(inputs, adapter=adapter_path)
    return session


def _main_inspect(args: argparse.Namespace) -> int:
    print("\n\n".join(describe(path) for path in args.paths))
    return 0


def _main_to_lora(args: argparse.Namespace) -> int:
    path = to_lora(args.adapter, args.output, args.adapter_name, combine=args.combine, base_model=args.base,
                   uniform_rank=args.uniform_rank)
    config = json.loads((path / "adapter_config.json").read_text())
    print(f"wrote PEFT LoRA {path}: r={config['r']} (lora_alpha=r, scaling 1), {len(config['target_modules'])} "
          f"layers, rank_pattern {config['rank_pattern'] or 'none'}, modules_to_save {config['modules_to_save']}")
    return 0


COMMANDS = {"inspect": (_inspect_parser, _main_inspect), "to-lora": (_to_lora_parser, _main_to_lora)}


def main(argv: list[str] | None = None) -> int:
    """Run miss-export with `argv`; returns 0. Errors are printed and raise SystemExit with the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    name = argv[0] if argv[:1] and argv[0] in COMMANDS else None
    parser, run = COMMANDS[name] if name else (_export_parser, _main_export)
    prog = f"miss-export {name}" if name else "miss-export"
    args = parser().parse_args(argv[1:] if name else argv)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        with quiet_library_noise():
            return run(args)
    except KeyboardInterrupt:
        raise _fail(f"{prog}: interrupted", 130, debug=False) from None
    except USER_ERRORS as error:
        raise _fail(f"{prog}: error: {error}", EXIT_USAGE, args.debug) from None
    except Exception as error:
        hint = "" if args.debug else " (run again with --debug for the traceback)"
        raise _fail(f"{prog}: failed: {type(error).__name__}: {error}{hint}", EXIT_FAILED, args.debug) from None


def _fail(message: str, status: int, debug: bool) -> _Exit:
    if debug:
        traceback.print_exc()
    print(message, file=sys.stderr, flush=True)
    return _Exit(message, status)


if __name__ == "__main__":
    sys.exit(main())
