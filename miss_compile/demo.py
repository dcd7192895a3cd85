"""The main job on a built-in default: a tiny Llama built from a config, MiSS applied, checked.

Run with `./dev demo` (or `python -m miss_compile`). Prints, per variant, the adapted model's
largest error against the reference math (the base model with merged weights) and eager timings.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import transformers

from . import reference
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    base = tiny_llama()
    input_ids = torch.randint(0, 512, (args.batch, args.seq))
    print(f"tiny Llama: {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters, "
          f"input {tuple(input_ids.shape)}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'variant':<9}{'layers':>7}{'block params':>14}{'max |err| vs reference':>25}{'eager ms':>10}{'base ms':>9}")
    for variant, config in VARIANTS.items():
        adapted = apply_miss(copy.deepcopy(base), config)
        with torch.no_grad():
            for layer in named_miss_layers(adapted).values():
                block = layer.miss_block["default"]
                block.copy_(torch.randn_like(block) * 0.05)
            expected = _reference_model(base, adapted)(input_ids, use_cache=False).logits
            actual = adapted(input_ids, use_cache=False).logits
            error = (actual - expected).abs().max().item()
            adapted_ms, base_ms = _median_ms(
                [lambda a=adapted: a(input_ids, use_cache=False), lambda: base(input_ids, use_cache=False)],
                args.repeats,
            )
        layers = named_miss_layers(adapted)
        params = sum(layer.miss_block["default"].numel() for layer in layers.values())
        print(f"{variant:<9}{len(layers):>7}{params:>14}{error:>25.2e}{adapted_ms:>10.2f}{base_ms:>9.2f}")
        if error > 1e-4:
            raise SystemExit(f"{variant}: adapted model differs from the reference by {error:.2e}")
    print("compile (miss_backend) and ONNX export join this table when they land.")


if __name__ == "__main__":
    main()
