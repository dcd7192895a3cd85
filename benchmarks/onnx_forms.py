"""The unmerged graph's adapter in other ONNX forms, timed against the merged graph on onnxruntime.

    .venv/bin/python -m benchmarks.onnx_forms [--shape small|8b] [--repeats N] [--quick]

The shipped form (export/translation.miss_linear) adds S(x) @ D to the base MatMul, S(x) a
Reshape + ReduceSum. The alternatives, each exact, each exported through the same exporter with its
translation swapped in and checked against torch before timing:
- fold: x @ (W.T + tile(D)), the update added to the weight in the graph on every run;
- matrix: S(x) as x @ P with the fixed 0/1 matrix P [in, r] (one MatMul instead of Reshape + ReduceSum);
- gemm: S(x) @ D + base as one 2-D Gemm with the base product as its C input (no separate Add).

A GEMM on [x, S(x)] against [W.T; D] would concatenate the weight on every run, the fold's cost with
a larger GEMM, and is not timed. The floor of any unmerged form that does not rebuild the weight: the
adapter product's multiply-adds (and, at one token, the bytes of D) over the base's, r / in per
projection.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import onnx_ir as ir
import onnxruntime
import torch
from onnxscript import opset18 as op

from miss_compile.export import export_onnx, load_session, translation
from miss_compile.export.runtime import MissSession
from miss_compile.reference import block_variant
from miss_compile.timing import interleaved_ms

from . import scale
from .machine import describe
from .models import SEVEN_PROJECTIONS, LlamaShape, peft_miss
from .training import FULL, QUICK

Value = Any
SHAPES = {"small": FULL, "8b": LlamaShape(hidden=4096, intermediate=14336, layers=1, heads=32, kv_heads=8)}
INPUTS = {"batch 1 x 128": (1, 128), "batch 4 x 16": (4, 16), "batch 1 x 1": (1, 1), "batch 8 x 1": (8, 1)}


def _ints(values: Sequence[int]) -> Value:
    return op.Constant(value_ints=list(values))


def fold_form(x: Value, adapter_inputs: Sequence[Value], weight: Value, bias: Value | None,
              blocks: Sequence[Value]) -> Value:
    """x @ (W.T + E(D)): W.T viewed as [in / r, r, out / columns, columns] plus D broadcast."""
    out_features, in_features = weight.shape
    weight_t = op.Transpose(weight, perm=[1, 0])
    for block in blocks:
        r, columns = block.shape
        grid = op.Reshape(weight_t, _ints([in_features // r, r, out_features // columns, columns]))
        weight_t = op.Reshape(op.Add(grid, op.Reshape(block, _ints([r, 1, columns]))), _ints([in_features, out_features]))
    result = op.MatMul(x, weight_t)
    return result if bias is None else op.Add(result, bias)


def matrix_form(x: Value, adapter_inputs: Sequence[Value], weight: Value, bias: Value | None,
                blocks: Sequence[Value]) -> Value:
    """S(a) as a @ P, P [in, r] with P[i, i % r] = 1."""
    out_features, in_features = weight.shape
    result = translation.base_linear(x, weight, bias)
    for adapter_input, block in zip(adapter_inputs, blocks, strict=True):
        r, columns = block.shape
        chunk = np.zeros((in_features, r), np.float32)
        chunk[np.arange(in_features), np.arange(in_features) % r] = 1.0
        product = op.MatMul(op.MatMul(adapter_input, op.Constant(value=ir.tensor(chunk))), block)
        if block_variant(block.shape, out_features) == "mini":
            product = op.Tile(product, _ints([1] * (len(x.shape) - 1) + [out_features // columns]))
        result = op.Add(result, product)
    return result


def gemm_form(x: Value, adapter_inputs: Sequence[Value], weight: Value, bias: Value | None,
              blocks: Sequence[Value]) -> Value:
    """The adapter product as a 2-D Gemm whose C input is the base product: the Add inside the GEMM."""
    out_features = weight.shape[0]
    result = translation.base_linear(x, weight, bias)
    shape = op.Shape(result)
    result = op.Reshape(result, _ints([-1, out_features]))
    for adapter_input, block in zip(adapter_inputs, blocks, strict=True):
        r, columns = block.shape
        if columns != out_features:
            raise NotImplementedError("onnx_forms: the Gemm form is written for balance blocks")
        chunk_sums = op.Reshape(translation.chunk_sum(adapter_input, r), _ints([-1, r]))
        result = op.Gemm(chunk_sums, block, result)
    return op.Reshape(result, shape)


FORMS = {"unmerged: S(x) @ D (shipped)": None, "unmerged: fold in the graph": fold_form,
         "unmerged: S(x) as x @ P": matrix_form, "unmerged: Gemm with the base as C": gemm_form}


def _session(model: torch.nn.Module, path: Path, merged: bool, form) -> MissSession:
    vocab = model.config.vocab_size
    table = {} if form is None else {torch.ops.miss.linear.default: form}
    with mock.patch.dict(translation.TRANSLATIONS, table):
        export_onnx(model, kwargs={"input_ids": torch.randint(0, vocab, (2, 16))}, path=path, merged=merged)
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no core stolen from the next run
    return load_session(path, device="cpu", session_options=options)


def floor(shape: LlamaShape, r: int) -> float:
    """The adapter product's multiply-adds over the base projections', r / in per projection: twice the
    training floor, whose base counts the forward and x's gradient."""
    return 2 * scale.floor(shape, r)


def run(shape: LlamaShape, r: int, inputs: dict[str, tuple[int, int]], repeats: int) -> list[dict]:
    model = peft_miss(shape.build(), "balance", r, SEVEN_PROJECTIONS).eval()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        sessions = {"merged": _session(model, Path(folder) / "merged.onnx", True, None)}
        for index, (name, form) in enumerate(FORMS.items()):
            sessions[name] = _session(model, Path(folder) / f"form{index}.onnx", False, form)
        for input_name, (batch, seq) in inputs.items():
            ids = torch.randint(0, shape.vocab, (batch, seq), generator=torch.Generator().manual_seed(seq))
            with torch.no_grad():
                expected = model(input_ids=ids).logits
            for name, session in sessions.items():
                error = (session.run({"input_ids": ids})[0].float() - expected).abs().max().item()
                if error > 1e-3:
                    raise AssertionError(f"onnx_forms: {name} differs from torch by {error:.3e} ({input_name})")
            times = interleaved_ms({name: (lambda s=session, ids=ids: s.run({"input_ids": ids})) for name, session in sessions.items()},
                                   repeats)
            rows += [{"input": input_name, "form": name, "ms": ms, "ratio": ms / times["merged"]} for name, ms in times.items()]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="small")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="a tiny model, two inputs (the suite runs run() on the same)")
    args = parser.parse_args(argv)
    shape, r = (QUICK, 8) if args.quick else (SHAPES[args.shape], 64)
    inputs = {"batch 2 x 32": (2, 32), "batch 1 x 1": (1, 1)} if args.quick else INPUTS
    for key, value in describe("cpu").items():
        print(f"- {key}: {value}")
    print(f"- model: Llama {shape.hidden} (int {shape.intermediate}), {shape.layers} layer(s), r={r} on seven "
          f"projections; floor of the unmerged forms (adapter MACs / base MACs): {floor(shape, r):.4f}")
    print("| input | form | ms | / merged |\n|---|---|---|---|")
    for row in run(shape, r, inputs, args.repeats):
        print(f"| {row['input']} | {row['form']} | {row['ms']:.2f} | {row['ratio']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
