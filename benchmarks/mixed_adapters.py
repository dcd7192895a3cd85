"""Many adapters in one batch: 32 requests over 8 MiSS adapters, mixed in one pass (stacked
adapters, miss.stacked_linear) against 8 single-adapter passes and against the merged
single-adapter model over the whole batch (the floor: the base model's cost), compiled with
miss_backend and on onnxruntime. Ratios are to the merged single-adapter pass of the same runtime.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import onnxruntime
import torch
from torch import nn

from miss_compile import (
    adapter_ids_for,
    apply_miss,
    merge_adapters,
    miss_backend,
    set_active_adapters,
    stack_adapters,
)
from miss_compile.export import export_onnx, load_session
from miss_compile.peft_compat import named_miss_layers
from miss_compile.timing import interleaved_ms

from .models import SEVEN_PROJECTIONS, miss_config
from .training import FULL, QUICK

TOLERANCE = 1e-3


def _adapted(shape, r: int, n_adapters: int) -> tuple[nn.Module, list[str]]:
    model = shape.build().eval()
    names = [f"tenant{k}" for k in range(n_adapters)]
    for name in names:
        apply_miss(model, miss_config("balance", r, SEVEN_PROJECTIONS), name)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in named_miss_layers(model).values():
            for block in layer.miss_block.values():
                block.copy_(torch.randn(block.shape, generator=generator) * 0.02)
    return stack_adapters(model), names


def _merged(model: nn.Module, name: str) -> nn.Module:
    merged = copy.deepcopy(model)
    set_active_adapters(merged, name)
    merge_adapters(merged)
    return merged


def _check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    error = (got.float() - want.float()).abs().max().item()
    if error > TOLERANCE:
        raise AssertionError(f"mixed-adapter benchmark: {name} differs from the mixed batch by {error:.3e}")


def _torch_rows(model: nn.Module, names: list[str], ids: torch.Tensor, requests: list[str], repeats: int,
                device: str) -> list[dict]:
    adapter_ids = adapter_ids_for(model, requests)
    compiled = torch.compile(model, backend=miss_backend)
    merged = torch.compile(_merged(model, names[0]), backend=miss_backend)
    rows_of = {name: [row for row, request in enumerate(requests) if request == name] for name in names}

    def mixed() -> torch.Tensor:
        return compiled(input_ids=ids, adapter_ids=adapter_ids).logits

    def separate() -> torch.Tensor:
        out = torch.empty(ids.shape[0], ids.shape[1], model.config.vocab_size, device=ids.device)
        for name, rows in rows_of.items():
            set_active_adapters(model, name)  # one graph per adapter, compiled in the warm-up
            out[rows] = compiled(input_ids=ids[rows]).logits
        return out

    with torch.no_grad():
        _check("8 single-adapter passes", separate(), mixed())
        times = interleaved_ms({"mixed batch, stacked adapters": mixed, "one pass per adapter": separate,
                                "merged single adapter, whole batch": lambda: merged(input_ids=ids).logits},
                               repeats, device=device)
    return _rows("miss_backend", len(requests), len(names), times)


def _onnx_rows(model: nn.Module, names: list[str], ids: torch.Tensor, requests: list[str], repeats: int,
               device: str, folder: Path) -> list[dict]:
    example = {"input_ids": ids[:2, :8]}
    adapter_ids = adapter_ids_for(model, requests)
    stacked_path, single_path, merged_path = (folder / f"{kind}.onnx" for kind in ("stacked", "single", "merged"))
    export_onnx(model, kwargs={**example, "adapter_ids": adapter_ids[:2]}, path=stacked_path)
    set_active_adapters(model, names[0])
    export_onnx(model, kwargs=example, path=single_path)
    export_onnx(model, kwargs=example, path=merged_path, merged=True)
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no core stolen from the next run
    stacked, single, merged = (load_session(p, device=device, session_options=options)
                               for p in (stacked_path, single_path, merged_path))
    # The single-adapter graph's blocks are overridable: each pass feeds one adapter's blocks.
    layers = named_miss_layers(model)
    feeds = {name: {f"{layer_name}.miss_block.{names[0]}": layer.miss_block[name].detach()
                    for layer_name, layer in layers.items()} for name in names}
    rows_of = {name: [row for row, request in enumerate(requests) if request == name] for name in names}

    def mixed() -> torch.Tensor:
        return stacked.run({"input_ids": ids, "adapter_ids": adapter_ids})[0]

    def separate() -> torch.Tensor:
        out = torch.empty(ids.shape[0], ids.shape[1], model.config.vocab_size)
        for name, rows in rows_of.items():
            out[rows] = single.run({"input_ids": ids[rows], **feeds[name]})[0].cpu()
        return out

    _check("onnxruntime single-adapter passes", separate(), mixed().cpu())
    times = interleaved_ms({"mixed batch, stacked adapters": mixed, "one pass per adapter": separate,
                            "merged single adapter, whole batch": lambda: merged.run({"input_ids": ids})},
                           repeats, device=device)
    provider = "CUDA" if stacked.device == "cuda" else "CPU"
    return _rows(f"onnxruntime {provider}", len(requests), len(names), times)


def _rows(runtime: str, requests: int, adapters: int, times: dict[str, float]) -> list[dict]:
    floor = times["merged single adapter, whole batch"]
    setting = f"{runtime}: {requests} requests over {adapters} adapters"
    return [{"table": "mixed", "setting": setting, "contender": name, "ms": ms, "ratio": ms / floor}
            for name, ms in times.items()]


def run(quick: bool, device: str = "cpu", repeats: int = 20) -> list[dict]:
    """Rows {table, setting, contender, ms, ratio}. quick (the suite runs it): 4 requests over 2 adapters
    on a one-layer Llama, since every adapter of the separate passes is its own compiled graph."""
    shape, r, requests, adapters, seq = (QUICK, 8, 4, 2, 8) if quick else (FULL, 64, 32, 8, 32)
    model, names = _adapted(shape, r, adapters)
    model.to(device)
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, shape.vocab, (requests, seq), generator=generator).to(device)
    order = torch.randperm(requests, generator=generator).tolist()
    mixed_requests = [names[k % adapters] for k in order]  # every adapter requested equally, rows shuffled
    # One graph per adapter for the separate passes, besides the mixed and merged ones.
    with torch._dynamo.config.patch(recompile_limit=max(64, 4 * adapters)):
        rows = _torch_rows(model, names, ids, mixed_requests, repeats, device)
    with tempfile.TemporaryDirectory() as folder:
        rows += _onnx_rows(model.cpu(), names, ids.cpu(), mixed_requests, repeats, device, Path(folder))
    return rows
