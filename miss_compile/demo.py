"""The main job on a built-in default: a tiny Llama built from a config, MiSS applied, compiled, checked.

Run with `./dev demo` (or `python -m miss_compile`). Prints, per variant, how many Linears became
miss ops (and were folded into W with merge=True), the largest error of eager, compiled and merged
against the reference math (the base model with merged weights), and interleaved median timings;
then the same model exported to merged and unmerged ONNX and run on onnxruntime. Progress (what is
loading, compiling, exporting) goes to stderr as it happens; the last line is the verdict, and the exit
status is 1 when any parity check failed.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from . import reference
from .backend import make_backend
from .config import MissConfig
from .inject import apply_miss
from .peft_compat import named_miss_layers
from .quiet import quiet_library_noise
from .timing import interleaved_ms

TOLERANCE = 1e-4  # fp32: every path against the reference math

VARIANTS = {
    "balance": MissConfig(r=8, target_modules="all-linear", init="random"),
    "mini": MissConfig(r=8, variant="mini", mini_r=16, target_modules="all-linear"),
    "bat": MissConfig(r=16, variant="bat", target_modules="all-linear"),
}


def tiny_llama(hidden: int = 128, layers: int = 2) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden + 32, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return transformers.LlamaForCausalLM(config).eval()


class _Progress:
    """One flushed line per stage on stderr, with the seconds since the demo started; a stage that runs
    longer than `every` seconds (a compile on a busy machine) says that it still runs."""

    def __init__(self, every: float = 15.0) -> None:
        self.start = self.last = time.perf_counter()
        self.every, self.stage = every, ""
        self.done = threading.Event()
        threading.Thread(target=self._heartbeat, daemon=True).start()

    def __call__(self, what: str) -> None:
        self.stage = what
        self._line(what)

    def close(self) -> None:
        self.done.set()

    def _line(self, text: str) -> None:
        self.last = time.perf_counter()
        print(f"[{self.last - self.start:6.1f} s] {text}", file=sys.stderr, flush=True)

    def _heartbeat(self) -> None:
        while not self.done.wait(1.0):
            if self.stage and time.perf_counter() - self.last >= self.every:
                self._line(f"  still {self.stage.split(' (')[0]}")


def _interleaved(contenders: list[Callable[[], object]], repeats: int) -> list[float]:
    times = interleaved_ms(dict(enumerate(contenders)), repeats, warmup=1)
    return [times[k] for k in range(len(contenders))]


def _reference_model(base: torch.nn.Module, adapted: torch.nn.Module) -> torch.nn.Module:
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in named_miss_layers(adapted).items():
            for adapter in layer.active_adapters:
                linear = merged.get_submodule(name)
                block = layer.miss_block[adapter]
                linear.weight.copy_(reference.merged_weight(linear.weight, block, layer.miss_variant[adapter]))
    return merged


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids, use_cache=False).logits


def _run_variant(base: torch.nn.Module, compiled_base: Callable, config: MissConfig, input_ids: torch.Tensor,
                 repeats: int, progress: _Progress) -> dict:
    variant = config.variant
    progress(f"{variant}: applying MiSS to every Linear, computing the reference (merged weights, eager)")
    adapted = apply_miss(copy.deepcopy(base), config)
    with torch.no_grad():
        for layer in named_miss_layers(adapted).values():
            block = layer.miss_block["default"]
            block.copy_(torch.randn_like(block) * 0.05)
    frozen = copy.deepcopy(adapted).requires_grad_(False)  # merging folds frozen adapters only
    unmerged_backend, merged_backend = make_backend(), make_backend(merge=True)
    compiled = torch.compile(adapted, backend=unmerged_backend)
    compiled_merged = torch.compile(frozen, backend=merged_backend)

    def merged(input_ids: torch.Tensor, use_cache: bool = False) -> object:
        # Freezing on while Dynamo traces: parameters become constants and W + dW is folded once.
        with torch._inductor.config.patch(freezing=True):
            return compiled_merged(input_ids, use_cache=use_cache)

    with torch.no_grad():
        expected = _logits(_reference_model(base, adapted), input_ids)
        errors = [(_logits(adapted, input_ids) - expected).abs().max().item()]
        progress(f"{variant}: compiling with miss_backend (MiSS layers as miss ops)")
        errors.append((_logits(compiled, input_ids) - expected).abs().max().item())
        progress(f"{variant}: compiling with make_backend(merge=True) (blocks folded into W)")
        errors.append((_logits(merged, input_ids) - expected).abs().max().item())
        progress(f"{variant}: timing {repeats} interleaved runs of eager, compiled, merged and the limit")
        times = _interleaved([lambda m=m: _logits(m, input_ids) for m in (adapted, compiled, merged, compiled_base)],
                             repeats)
    onnx_errors, onnx_times = _onnx_rows(adapted, input_ids, expected, repeats, lambda what: progress(f"{variant}: {what}"))
    layers = named_miss_layers(adapted)
    return {
        "onnx_errors": onnx_errors,
        "onnx_times": onnx_times,
        "layers": len(layers),
        "rewritten": sum(len(report.rewritten) for report in unmerged_backend.graph_pass.reports),
        "folded": sum(item.merged for report in merged_backend.graph_pass.reports for item in report.rewritten),
        "errors": errors,
        "times": times,
    }


def _onnx_rows(adapted: torch.nn.Module, input_ids: torch.Tensor, expected: torch.Tensor,
               repeats: int, progress: Callable[[str], None]) -> tuple[list[float], list[float]]:
    """Merged and unmerged ONNX on onnxruntime: errors against the reference, interleaved timings."""
    import onnxruntime

    from miss_compile.export import export_onnx, load_session  # installed from the export/ folder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as folder:
        sessions = []
        for merged in (True, False):
            path = Path(folder) / f"{'merged' if merged else 'unmerged'}.onnx"
            progress(f"exporting {path.name} and starting an onnxruntime session")
            export_onnx(adapted, kwargs={"input_ids": input_ids}, path=path, merged=merged)
            options = onnxruntime.SessionOptions()
            # No spin-waiting after a run: it would steal the cores from the interleaved torch runs.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sessions.append(load_session(path, device=device, session_options=options))
        feeds = {"input_ids": input_ids}
        progress(f"running onnxruntime: errors, then {repeats} interleaved runs")
        errors = [(session.run(feeds)[0].cpu() - expected).abs().max().item() for session in sessions]
        with torch.no_grad():
            times = _interleaved([lambda s=s: s.run(feeds) for s in sessions] + [lambda: _logits(adapted, input_ids)],
                               repeats)
    return errors, times


def _failures(variant: str, row: dict) -> list[str]:
    """The parity checks of one variant that failed, in words."""
    checks = [*zip(("eager", "compiled", "merged"), row["errors"], strict=True),
              *zip(("ONNX merged", "ONNX unmerged"), row["onnx_errors"], strict=True)]
    failed = [f"{variant} {path} error {error:.2e} > {TOLERANCE:.0e}" for path, error in checks
              if not error <= TOLERANCE]  # NaN fails too
    failed += [f"{variant} {row[key]}/{row['layers']} layers {what}" for key, what in
               (("rewritten", "as miss ops"), ("folded", "folded into W")) if row[key] != row["layers"]]
    return failed


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status (0: every parity check passed, 1: some failed)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)
    progress = _Progress()
    try:
        return _run(args, progress)
    finally:
        progress.close()


def _run(args: argparse.Namespace, progress: _Progress) -> int:
    torch.manual_seed(0)
    progress("building a tiny Llama from a config (no download)")
    base = tiny_llama()
    input_ids = torch.randint(0, 512, (args.batch, args.seq))
    compiled_base = torch.compile(base)
    print(f"tiny Llama: {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters, "
          f"input {tuple(input_ids.shape)}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()}", flush=True)
    progress("compiling the base model with stock Inductor (the limit column)")
    with torch.no_grad():
        _logits(compiled_base, input_ids)
    print("max |error| against the reference math (the base model with merged weights); median ms of "
          f"{args.repeats} interleaved runs; limit = torch.compile of the base model")
    header = ("variant", "layers", "as op", "folded", "err eager", "err compiled", "err merged",
              "eager ms", "compiled ms", "merged ms", "limit ms")
    print(("{:<9}" + "{:>8}" * 3 + "{:>13}" * 3 + "{:>12}" * 4).format(*header), flush=True)
    rows, failed = {}, []
    with quiet_library_noise():
        for variant in args.variants:
            row = rows[variant] = _run_variant(base, compiled_base, VARIANTS[variant], input_ids, args.repeats,
                                               progress)
            print(("{:<9}" + "{:>8}" * 3 + "{:>13.2e}" * 3 + "{:>12.2f}" * 4).format(
                variant, row["layers"], row["rewritten"], row["folded"], *row["errors"], *row["times"]), flush=True)
            failed += _failures(variant, row)
    print(f"\nonnxruntime ({'CUDA' if torch.cuda.is_available() else 'CPU'} provider), same inputs and reference")
    print(("{:<9}" + "{:>13}" * 2 + "{:>12}" * 3).format(
        "variant", "err merged", "err unmerged", "merged ms", "unmerged ms", "torch eager"))
    for variant, row in rows.items():
        print(("{:<9}" + "{:>13.2e}" * 2 + "{:>12.2f}" * 3).format(variant, *row["onnx_errors"], *row["onnx_times"]))
    checks = len(rows) * 7  # per variant: 5 errors, every layer as an op, every layer folded
    if failed:
        print(f"\nverdict: FAILED {len(failed)} of {checks} parity checks: {'; '.join(failed)}", flush=True)
        return 1
    print(f"\nverdict: all {checks} parity checks passed ({', '.join(rows)}: eager, compiled, merged, ONNX merged "
          f"and unmerged within {TOLERANCE:.0e} of the reference; every layer as a miss op and folded)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
