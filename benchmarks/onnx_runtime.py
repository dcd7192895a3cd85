"""Table 4: the adapted Llama-shaped model on onnxruntime, merged against unmerged, beside torch eager."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnxruntime
import torch

from miss_compile.export import export_onnx, load_session
from miss_compile.timing import interleaved_ms

from .models import SEVEN_PROJECTIONS, peft_miss
from .training import FULL, QUICK


def _session(model: torch.nn.Module, folder: Path, merged: bool, device: str, vocab: int):
    path = folder / f"{'merged' if merged else 'unmerged'}.onnx"
    example = torch.randint(0, vocab, (2, 16))  # dynamic batch and length; size-1 examples would pin them
    export_onnx(model, kwargs={"input_ids": example}, path=path, merged=merged)
    options = onnxruntime.SessionOptions()
    # No spin-waiting after a run: it would steal the cores from the next contender's run.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return load_session(path, device=device, session_options=options)


def run(quick: bool, device: str, repeats: int) -> list[dict]:
    shape, r = (QUICK, 8) if quick else (FULL, 64)
    inputs = {"batch 1 x 128": (1, 128), "batch 4 x 16": (4, 16)} if not quick else {"batch 2 x 32": (2, 32)}
    model = peft_miss(shape.build(), "balance", r, SEVEN_PROJECTIONS).eval()
    provider = "CUDA" if device == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "CPU"
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        sessions = {name: _session(model, Path(folder), merged, device, shape.vocab)
                    for name, merged in (("onnxruntime merged", True), ("onnxruntime unmerged", False))}
        for input_name, (batch, seq) in inputs.items():
            ids = torch.randint(0, shape.vocab, (batch, seq))
            with torch.no_grad():
                expected = model(input_ids=ids).logits
                for name, session in sessions.items():
                    error = (session.run({"input_ids": ids})[0].cpu().float() - expected).abs().max().item()
                    if error > 1e-3:
                        raise AssertionError(f"onnxruntime benchmark: {name} differs from torch by {error:.3e}")
                contenders = {name: (lambda s=session, ids=ids: s.run({"input_ids": ids})) for name, session in sessions.items()}
                contenders["torch eager (PEFT MiSS)"] = lambda ids=ids: model(input_ids=ids)
                times = interleaved_ms(contenders, repeats)
            merged_ms = times["onnxruntime merged"]
            rows += [{"table": "onnxruntime", "provider": provider, "input": input_name, "contender": name,
                      "ms": ms, "ratio": ms / merged_ms} for name, ms in times.items()]
    return rows
