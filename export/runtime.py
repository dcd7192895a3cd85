"""onnxruntime sessions for exported MiSS models: torch tensors in and out, adapters per run.

    session = load_session("model.onnx", device="cuda")   # CPU, with one warning, where CUDA is absent
    logits, = session.run({"input_ids": ids}, adapter="other.onnx_adapter")
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

__all__ = ["load_session", "MissSession"]

logger = logging.getLogger(__name__)

_warned_cpu_fallback = False


def _providers(device: str) -> list[str]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")


def _warn_cpu_fallback(reason: str) -> None:
    global _warned_cpu_fallback
    if not _warned_cpu_fallback:
        warnings.warn(f"onnxruntime runs on the CPU: {reason}", RuntimeWarning, stacklevel=3)
        _warned_cpu_fallback = True


class MissSession:
    """An InferenceSession with torch I/O, IO binding on CUDA, and cached adapter files."""

    def __init__(self, session: ort.InferenceSession, io_binding: bool = False) -> None:
        self.session = session
        self.io_binding = io_binding
        self.device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.input_names = [i.name for i in session.get_inputs()]
        # Overridable initializers (MiSS blocks and stacks): fed per run like inputs, or by an adapter file.
        self.overridable_names = [i.name for i in session.get_overridable_initializers()]
        self.output_names = [o.name for o in session.get_outputs()]
        self._adapters: dict[str, ort.LoraAdapter] = {}

    def _adapter(self, adapter: str | os.PathLike | ort.LoraAdapter) -> ort.LoraAdapter:
        if isinstance(adapter, ort.LoraAdapter):
            return adapter
        key = str(Path(adapter).resolve())
        if key not in self._adapters:
            if not Path(key).is_file():
                raise FileNotFoundError(f"adapter file {key} not found; write one with export.write_onnx_adapter")
            loaded = ort.LoraAdapter()
            loaded.Load(key)
            self._adapters[key] = loaded
        return self._adapters[key]

    def run(
        self,
        inputs: Mapping[str, torch.Tensor],
        adapter: str | os.PathLike | ort.LoraAdapter | None = None,
    ) -> list[torch.Tensor]:
        unknown = sorted(set(inputs) - set(self.input_names) - set(self.overridable_names))
        if unknown:
            raise ValueError(f"unknown inputs {unknown}; the graph takes {self.input_names} "
                             f"and {len(self.overridable_names)} overridable blocks")
        ids = inputs.get("adapter_ids")
        if ids is not None and ids.numel() and int(ids.min()) < -1:
            # Gather would take -2 as the last real adapter; only -1 (NO_ADAPTER, the zero block) is meant.
            raise ValueError(f"adapter_ids {ids.tolist()}: ids run from 0 to the number of stacked adapters - 1, "
                             "and -1 means no adapter; build them with miss_compile.adapter_ids_for")
        options = ort.RunOptions()
        if adapter is not None:
            options.add_active_adapter(self._adapter(adapter))
        if self.device == "cuda" or self.io_binding:
            return self._run_bound(inputs, options)
        feeds = {name: value.detach().cpu().numpy() for name, value in inputs.items()}
        return [torch.from_numpy(np.asarray(out)) for out in self.session.run(None, feeds, options)]

    def _run_bound(self, inputs: Mapping[str, torch.Tensor], options: ort.RunOptions) -> list[torch.Tensor]:
        # IO binding: onnxruntime reads the inputs where torch keeps them (no copy through numpy)
        # and leaves the outputs on the session's device. The same path runs on CPU in the tests.
        binding = self.session.io_binding()
        kept = []  # the bound memory must outlive the run
        for name, value in inputs.items():
            value = value.detach().to(self.device).contiguous()
            kept.append(value)
            binding.bind_input(name, self.device, 0, _numpy_dtype(value.dtype), list(value.shape), value.data_ptr())
        for name in self.output_names:
            binding.bind_output(name, self.device, 0)
        self.session.run_with_iobinding(binding, options)
        return [_to_torch(out, self.device) for out in binding.get_outputs()]


def _numpy_dtype(dtype: torch.dtype) -> type:
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
            torch.int32: np.int32, torch.bool: np.bool_}[dtype]


def _to_torch(value: ort.OrtValue, device: str) -> torch.Tensor:
    if device == "cuda":
        return torch.from_dlpack(value.to_dlpack())  # stays on the GPU, no copy
    return torch.from_numpy(value.numpy())


def load_session(
    path: str | os.PathLike,
    device: str = "cuda",
    session_options: ort.SessionOptions | None = None,
    io_binding: bool | None = None,
) -> MissSession:
    """An onnxruntime session on `device`; "cuda" falls back to the CPU with one warning.

    On CUDA runs always use IO binding on torch tensors; io_binding=True uses it on the CPU too."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    options = session_options or ort.SessionOptions()
    options.log_severity_level = 3  # overridable blocks are graph inputs by design: no warning per block
    providers = _providers(device)
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        _warn_cpu_fallback("this onnxruntime build has no CUDA provider (install onnxruntime-gpu)")
        providers = ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), options, providers=providers)
    if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        _warn_cpu_fallback("the CUDA provider did not load (no GPU, or CUDA/cuDNN libraries missing)")
    return MissSession(session, io_binding=bool(io_binding))
