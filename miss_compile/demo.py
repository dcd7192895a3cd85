"""The main job on a built-in default: a tiny Llama built from a config, MiSS applied, compiled, checked.

Run with `./dev demo` (or `python -m miss_compile`). Prints, per variant, how many Linears became
miss ops (and were folded into W with merge=True), the largest error of eager, compiled and merged
against the reference math (the base model with merged weights), and interleaved median timings.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable

import torch
import transformers

from . import reference
from .backend import make_backend
from .config import MissConfig
from .inject import apply_miss
from .peft_compat import named_miss_layers

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


def _median_ms(contenders: list, repeats: int) -> list[float]:
    """Median wall time of each callable, runs interleaved so machine noise hits all alike."""
    times: list[list[float]] = [[] for _ in contenders]
    for _ in range(repeats):
        for fn, samples in zip(contenders, times, strict=True):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(samples) for samples in times]


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
                 repeats: int) -> dict:
    adapted = apply_miss(copy.deepcopy(base), config)
    with torch.no_grad():
        for layer in named_miss_layers(adapted).values():
            block = layer.miss_block["default"]
            block.copy_(torch.randn_like(block) * 0.05)
    frozen = copy.deepcopy(adapted).requires_grad_(False)  # merging folds frozen adapters only
    unmerged_backend, merged_backend = make_backend(), make_backend(merge=True)
    compiled = torch.compile(adapted, backend=unmerged_backend)
    merged = torch.compile(frozen, backend=merged_backend)
    with torch.no_grad():
        expected = _logits(_reference_model(base, adapted), input_ids)
        errors = [(_logits(model, input_ids) - expected).abs().max().item() for model in (adapted, compiled, merged)]
        times = _median_ms([lambda m=m: _logits(m, input_ids) for m in (adapted, compiled, merged, compiled_base)],
                           repeats)
    layers = named_miss_layers(adapted)
    return {
        "layers": len(layers),
        "rewritten": sum(len(report.rewritten) for report in unmerged_backend.graph_pass.reports),
        "folded": sum(item.merged for report in merged_backend.graph_pass.reports for item in report.rewritten),
        "errors": errors,
        "times": times,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    base = tiny_llama()
    input_ids = torch.randint(0, 512, (args.batch, args.seq))
    compiled_base = torch.compile(base)
    print(f"tiny Llama: {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters, "
          f"input {tuple(input_ids.shape)}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()}")
    print("max |error| against the reference math (the base model with merged weights); median ms of "
          f"{args.repeats} interleaved runs; limit = torch.compile of the base model")
    header = ("variant", "layers", "as op", "folded", "err eager", "err compiled", "err merged",
              "eager ms", "compiled ms", "merged ms", "limit ms")
    print(("{:<9}" + "{:>8}" * 3 + "{:>13}" * 3 + "{:>12}" * 4).format(*header))
    for variant in args.variants:
        row = _run_variant(base, compiled_base, VARIANTS[variant], input_ids, args.repeats)
        print(("{:<9}" + "{:>8}" * 3 + "{:>13.2e}" * 3 + "{:>12.2f}" * 4).format(
            variant, row["layers"], row["rewritten"], row["folded"], *row["errors"], *row["times"]))
        worst = max(row["errors"])
        if worst > 1e-4 or row["rewritten"] != row["layers"] or row["folded"] != row["layers"]:
            raise SystemExit(f"{variant}: error {worst:.2e}, {row['rewritten']}/{row['layers']} layers as ops, "
                             f"{row['folded']}/{row['layers']} folded")
    print("ONNX export joins this table when it lands.")


if __name__ == "__main__":
    main()
