"""Calibrate and check miss_compile.fold_rule: the two prices, then fold against separate at both sides
of the rule's threshold.

    .venv/bin/python -m benchmarks.fold_calibration [--device cuda] [--quick]

Prices: a fold pass over a weight (seconds per byte read or written) and the thin adapter GEMM
[tokens, r] x [r, out] (seconds per multiply-add, its output's write priced as bytes). Check: the two
forms of one adapted Linear's forward (x @ (W + dW).T against addmm(S(x) @ D, x, W.T)) and of x's
gradient (grad @ (W + dW) against grad @ W + tile(grad @ D.T)), compiled by stock Inductor, timed
interleaved at token counts around the rule's memory bound; each row says which was faster and what
fold_rule chooses.
"""

from __future__ import annotations

import argparse
import sys

import torch

from miss_compile import fold_rule, reference
from miss_compile.timing import interleaved_ms

from .machine import describe


def _delta_t(block: torch.Tensor, in_features: int) -> torch.Tensor:
    return block.repeat(-(-in_features // block.shape[0]), 1)[:in_features]  # [in, out]: row i is D[i % r]


def _forward_forms(x, weight, block):
    in_features = weight.shape[1]

    def fold():
        return x @ (weight.t() + _delta_t(block, in_features))

    def separate():
        return torch.addmm(reference.chunk_sum(x, block.shape[0]) @ block, x, weight.t())

    return fold, separate


def _backward_forms(grad, weight, block):
    in_features = weight.shape[1]

    def fold():
        return grad @ (weight + _delta_t(block, in_features).t())

    def separate():
        tiled = (grad @ block.t()).repeat(1, -(-in_features // block.shape[0]))[:, :in_features]
        return torch.addmm(tiled, grad, weight)

    return fold, separate


def measure_prices(device: str, repeats: int, features: int = 4096, tokens: int = 2048, r: int = 64) -> dict:
    weight = torch.randn(features, features, device=device)
    block = torch.randn(r, features, device=device) * 0.02
    chunk_sums = torch.randn(tokens, r, device=device)
    fold = torch.compile(lambda: weight.t() + _delta_t(block, features))
    thin = torch.compile(lambda: chunk_sums @ block)
    times = interleaved_ms({"fold": fold, "thin": thin}, repeats, device=device)
    seconds_per_byte = times["fold"] / 1e3 / (2 * features * features * 4)
    seconds_per_mac = (times["thin"] / 1e3 - tokens * features * 4 * seconds_per_byte) / (tokens * r * features)
    return {"seconds_per_byte": seconds_per_byte, "seconds_per_mac": max(seconds_per_mac, 0.0),
            "fold_ms": times["fold"], "thin_ms": times["thin"]}


def check_rule(device: str, repeats: int, quick: bool) -> list[dict]:
    shapes = [(1024, 1024)] if quick else [(1024, 1024), (2048, 2048), (1024, 3584), (3584, 1024)]
    token_counts = [64, 1024] if quick else [256, 1024, 2048, 4096]
    r, rows = 64, []
    for in_features, out_features in shapes:
        weight = torch.randn(out_features, in_features, device=device)
        block = torch.randn(r, out_features, device=device) * 0.02
        for tokens in token_counts:
            for backward in (False, True):
                data = torch.randn(tokens, out_features if backward else in_features, device=device)
                fold, separate = (_backward_forms if backward else _forward_forms)(data, weight, block)
                fold, separate = torch.compile(fold), torch.compile(separate)
                torch.testing.assert_close(fold(), separate(), atol=1e-3, rtol=1e-3)
                times = interleaved_ms({"fold": fold, "separate": separate}, repeats, device=device)
                chosen = fold_rule.folds(tokens, in_features, out_features, device, backward)
                faster = "fold" if times["fold"] < times["separate"] else "separate"
                rows.append({"table": "fold", "setting": f"{in_features}->{out_features}, r={r}, fp32",
                             "direction": "backward (x grad)" if backward else "forward", "tokens": tokens,
                             "fold_ms": times["fold"], "separate_ms": times["separate"], "faster": faster,
                             "rule": "fold" if chosen else "separate",
                             "rule_cost_ms": times["fold" if chosen else "separate"] / min(times.values())})
                del data
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    for key, value in describe(args.device).items():
        print(f"- {key}: {value}")
    prices = measure_prices(args.device, args.repeats, features=1024 if args.quick else 4096)
    print(f"measured prices ({args.device}): {prices}")
    print("| setting | direction | tokens | fold ms | separate ms | faster | rule | rule's time / best |")
    print("|---|---|---|---|---|---|---|---|")
    for row in check_rule(args.device, args.repeats, args.quick):
        print(f"| {row['setting']} | {row['direction']} | {row['tokens']} | {row['fold_ms']:.2f} | "
              f"{row['separate_ms']:.2f} | {row['faster']} | {row['rule']} | {row['rule_cost_ms']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
