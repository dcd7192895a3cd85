"""onnxruntime sessions for exported MiSS models: torch tensors (or numpy arrays) in, torch tensors out,
adapters per run.

    session = load_session("model.onnx")   # device="auto": CUDA when it can start, else the CPU, quietly
    session.device, session.providers      # what it chose
    logits, = session.run({"input_ids": ids}, adapter="other.onnx_adapter")

Adapter files are read once into a private copy (onnxruntime's LoraAdapter maps the file, so a
rewrite in place would change an adapter under a running session), checked against the session's
overridable initializers (names, shapes, dtypes, coverage), fed with each run, and cached by path:
the next run with the same path rereads the file when it changed (see `_FileIdentity`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from .adapters import NO_BLOCKS, adapter_fit_problems, read_onnx_adapter, signature
from .inputs import with_default_inputs
from .names import is_block_input, is_stack_input, split_block_input
from .provenance import PREDATES_WARNING, predates_saved_modules, saved_modules_refusal

__all__ = ["load_session", "MissSession", "AdapterFile"]

logger = logging.getLogger(__name__)

_warned_cpu_fallback = False

_ORT_TO_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
                 "tensor(bfloat16)": torch.bfloat16, "tensor(int64)": torch.int64, "tensor(int32)": torch.int32,
                 "tensor(bool)": torch.bool}

# File systems stamp mtime/ctime from a coarse clock (ext4/xfs/tmpfs: the kernel tick, a few ms;
# FAT: 2 s), so a same-size rewrite in place within one tick can keep every stat field. While a
# file's stamps are this recent, its contents are hashed too (git's "racily clean" rule).
_RACY_NS = 2_000_000_000
_READ_ATTEMPTS = 3  # a file that changes while it is read is read again


def _providers(device: str) -> list[str]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")


def _cuda_unavailable() -> str | None:
    """Why the CUDA provider cannot serve this session's torch tensors, or None when it can be tried.
    Asked before onnxruntime tries it: a failed try prints onnxruntime's own error (libcublasLt ...)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (no GPU, or a CPU-only torch), and the session's tensors live in torch"
    return None


def _warn_cpu_fallback(reason: str) -> None:
    global _warned_cpu_fallback
    if not _warned_cpu_fallback:
        warnings.warn(f"onnxruntime runs on the CPU: {reason}", RuntimeWarning, stacklevel=3)
        _warned_cpu_fallback = True


@dataclass(frozen=True)
class _FileIdentity:
    """What says a file is still the one loaded: device, inode, size, mtime and ctime (a user cannot
    set ctime, so `touch -d` or `cp -p` over the file changes it), and, while the stamps are younger
    than _RACY_NS, a hash of the contents (a same-size rewrite within one clock tick keeps every stat
    field). Not seen: file systems whose stamps do not move on write (some network mounts) or a clock
    set back past the stamps; give such files a new name per version."""

    stat: tuple[int, ...]
    digest: str | None

    @classmethod
    def of(cls, path: str) -> _FileIdentity:
        st = os.stat(path)
        stat = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        racy = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < _RACY_NS
        return cls(stat, _digest(path) if racy else None)

    def matches(self, current: _FileIdentity, path: str) -> bool:
        """Whether `current` (of the same path, now) is still the file this identity was taken of."""
        if current.stat != self.stat:
            return False
        # loaded while racy: only the contents can tell a same-stat rewrite apart
        return self.digest is None or (current.digest or _digest(path)) == self.digest


def _digest(path: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class AdapterFile:
    """An `.onnx_adapter` as a session loaded it: its own copy of the parameters (graph input name ->
    tensor on the session's device), checked against the graph. A snapshot: pass the path to
    MissSession.run to follow the file as it changes."""

    path: str
    parameters: dict[str, torch.Tensor]


@dataclass
class _Cached:
    identity: _FileIdentity
    adapter: AdapterFile


class MissSession:
    """An InferenceSession with torch I/O, IO binding on CUDA, and checked, cached adapter files."""

    def __init__(self, session: ort.InferenceSession, io_binding: bool = False, stack_rows: int | None = None) -> None:
        self.session = session
        self.io_binding = io_binding
        self.providers = session.get_providers()  # what onnxruntime runs on, first choice first
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.input_names = [i.name for i in session.get_inputs()]
        # Overridable initializers (MiSS blocks and stacks): fed per run like inputs, or by an adapter file.
        self.overridable_names = [i.name for i in session.get_overridable_initializers()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.input_types = {i.name: i.type for i in [*session.get_inputs(), *session.get_overridable_initializers()]}
        # what the exporter recorded (export.provenance): decides adapter files and generate's eos
        self.metadata: dict[str, str] = dict(session.get_modelmeta().custom_metadata_map)
        # decided once: adapter files refused (the graph holds trained heads), or not checkable (older export)
        self._adapter_refusal = saved_modules_refusal(self.metadata, "this session's graph")
        self._unchecked_heads = predates_saved_modules(self.metadata)
        self._overridable = {i.name: (tuple(i.shape), i.type) for i in session.get_overridable_initializers()}
        self._adapters: dict[str, _Cached] = {}
        # Rows of the exported stacks (n adapters + the zero block); the graph's first dim is symbolic.
        self._stack_rows = stack_rows
        self._adapters_lock = threading.Lock()  # one session serves many threads

    def load_adapter(self, path: str | os.PathLike, partial: bool = False) -> AdapterFile:
        """The adapter file at `path`, checked against this graph and cached; read again when the
        file changed (rewritten in place or replaced). A file that leaves graph blocks out is refused
        unless `partial=True` (those blocks then run with the values the graph was exported with)."""
        self._refuse_adapter_files()
        key = str(Path(path).resolve())
        with self._adapters_lock:
            cached = self._adapters.get(key)
            try:
                current = _FileIdentity.of(key)
            except FileNotFoundError:
                self._adapters.pop(key, None)
                raise FileNotFoundError(f"adapter file {key} not found; write one with export.write_onnx_adapter") from None
            if cached is None or not cached.identity.matches(current, key):
                cached = self._adapters[key] = self._read_file(key)
            elif current.digest is None:
                # checked past the racy window: any later write gets newer stamps, so the stat decides from now on
                cached.identity = current
        self._check_coverage(cached.adapter, partial)
        return cached.adapter

    def _refuse_adapter_files(self) -> None:
        """Adapter files swap blocks only: refused for a graph holding its adapter's trained heads."""
        if self._adapter_refusal:
            raise ValueError(f"adapter files are refused: {self._adapter_refusal}")
        if self._unchecked_heads:
            self._unchecked_heads = False  # said once per session
            logger.warning("this session's graph %s", PREDATES_WARNING)

    def _read_file(self, key: str) -> _Cached:
        for _ in range(_READ_ATTEMPTS):
            before = _FileIdentity.of(key)
            arrays = read_onnx_adapter(key)
            if _FileIdentity.of(key) == before:  # not rewritten while it was read
                break
        else:
            raise RuntimeError(f"adapter file {key} changed while it was read, {_READ_ATTEMPTS} times; write it "
                               "atomically (export.write_onnx_adapter writes beside it and renames)")
        if not self._overridable:
            raise ValueError(f"adapter file {key}: this session's graph {NO_BLOCKS}")
        problems = adapter_fit_problems(signature(arrays), self._overridable, partial=True)
        if problems:
            raise ValueError(f"adapter file {key} does not fit this graph:\n  " + "\n  ".join(problems))
        parameters = {name: torch.from_numpy(array).to(self.device) for name, array in arrays.items()}
        logger.info("read adapter file %s (%d of %d blocks)", key, len(parameters), len(self._overridable))
        return _Cached(before, AdapterFile(key, parameters))

    def _check_coverage(self, adapter: AdapterFile, partial: bool) -> None:
        # Against this session's graph (an AdapterFile may come from another session's load_adapter).
        missing = sorted(set(self._overridable) - set(adapter.parameters))
        if missing and any(is_stack_input(name) for name in adapter.parameters):
            raise ValueError(
                f"adapter file {adapter.path} holds stacks for {len(adapter.parameters)} of the graph's "
                f"{len(self._overridable)} overridable inputs (missing {missing[0]!r}, ...): id k would pick "
                "the file's k-th adapter in some layers and the export's in others, partial or not. Write every "
                "layer's stack with write_onnx_stack(model, path, model_path=<this graph>)")
        if missing and not partial:
            shown = ", ".join(repr(name) for name in missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise ValueError(
                f"adapter file {adapter.path} covers {len(self._overridable) - len(missing)} of the graph's "
                f"{len(self._overridable)} blocks; missing {shown}: those layers would run the blocks the graph was "
                "exported with. Write the file with write_onnx_adapter(..., model_path=<this graph>) to check "
                "coverage, or pass partial=True if the exported defaults are meant for them")

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 20,
                 **options: object) -> torch.Tensor:
        """Greedy token ids [batch, prompt + new] on a graph from export_causal_lm (see export.generate)."""
        from .generate import generate  # generate imports the exporter; a session alone does not need it

        return generate(self, input_ids, attention_mask, max_new_tokens, **options)

    def run(
        self,
        inputs: Mapping[str, torch.Tensor | np.ndarray],
        adapter: str | os.PathLike | AdapterFile | ort.LoraAdapter | None = None,
        partial: bool = False,
    ) -> list[torch.Tensor]:
        """Outputs as torch tensors (on the session's device), whether the inputs are torch tensors or
        numpy arrays (`.numpy()` an output for numpy). `adapter`: an `.onnx_adapter` path (checked, read
        again when it changes; see load_adapter for `partial`), an AdapterFile from load_adapter, or
        an ort.LoraAdapter used as it is (unchecked: onnxruntime does not expose its names)."""
        inputs = with_default_inputs(inputs, self.session.get_inputs())  # a mask / token types left out: no padding
        unknown = sorted(set(inputs) - set(self.input_names) - set(self.overridable_names))
        if unknown:
            raise ValueError(f"unknown inputs {unknown}; the graph takes {self.input_names} "
                             f"and {len(self.overridable_names)} overridable blocks")
        inputs = {name: self._as_graph_dtype(name, value) for name, value in inputs.items()}
        options = ort.RunOptions()
        if adapter is not None:
            self._refuse_adapter_files()
        if isinstance(adapter, ort.LoraAdapter):
            options.add_active_adapter(adapter)
        elif adapter is not None:
            inputs = self._with_adapter(inputs, adapter, partial)
        self._check_ids(inputs)
        try:
            if self.device == "cuda" or self.io_binding:
                return self._run_bound(inputs, options)
            feeds = {name: value.detach().cpu().numpy() for name, value in inputs.items()}
            return [torch.from_numpy(np.asarray(out)) for out in self.session.run(None, feeds, options)]
        except Exception as error:  # onnxruntime's own error types
            if isinstance(adapter, ort.LoraAdapter) and "Invalid input name: " in str(error):
                raise self._unknown_adapter_input(str(error)) from error
            raise

    def _unknown_adapter_input(self, message: str) -> ValueError:
        """onnxruntime's "Invalid input name" for an ort.LoraAdapter, said in graph terms."""
        name = message.rpartition("Invalid input name: ")[2].strip()
        if not self._overridable:
            return ValueError(f"the ort.LoraAdapter feeds {name!r}, and this session's graph {NO_BLOCKS}")
        layer, file_name = split_block_input(name) if is_block_input(name) else (name, None)
        graph_names = sorted({split_block_input(n)[1] for n in self._overridable
                              if is_block_input(n) and split_block_input(n)[0] == layer})
        if file_name is None or not graph_names:
            return ValueError(f"the ort.LoraAdapter feeds {name!r}, which is not an overridable input of this graph")
        return ValueError(
            f"the ort.LoraAdapter holds blocks for adapter name {file_name!r} ({name!r}) while the graph was exported "
            f"with {graph_names}: write the file again with write_onnx_adapter(..., as_name={graph_names[0]!r}), or "
            f"export the graph with the file's name (miss-export --adapter-name {file_name})")

    def _check_ids(self, inputs: Mapping[str, torch.Tensor]) -> None:
        """Ids from -1 to n - 1 for the n adapters of the stacks this run uses: Gather would take -2 as
        the last real adapter and n as the zero block (the base output, silently)."""
        ids = inputs.get("adapter_ids")
        if ids is None or not ids.numel():
            return
        fed = [value.shape[0] for name, value in inputs.items() if is_stack_input(name)]
        rows = min(fed) if fed else self._stack_rows
        low, high = (int(v) for v in ids.aminmax())
        if low < -1 or (rows is not None and high >= rows - 1):
            adapters = "the number of stacked adapters" if rows is None else f"{rows - 1} (the stacked adapters)"
            raise ValueError(f"adapter_ids {ids.tolist()}: ids run from 0 to {adapters} - 1, and -1 means no "
                             "adapter; build them with miss_compile.adapter_ids_for for the stack this run uses")

    def _with_adapter(self, inputs: dict[str, torch.Tensor], adapter: str | os.PathLike | AdapterFile,
                      partial: bool) -> dict[str, torch.Tensor]:
        """The adapter's parameters fed as the overridable initializers they replace."""
        if isinstance(adapter, AdapterFile):
            self._check_coverage(adapter, partial)
        else:
            adapter = self.load_adapter(adapter, partial)
        both = sorted(set(inputs) & set(adapter.parameters))
        if both:
            raise ValueError(f"{both[:3]} given as inputs and by the adapter file {adapter.path}; pass one of them")
        return {**inputs, **adapter.parameters}

    def input_dtype(self, name: str) -> torch.dtype | None:
        """The torch dtype of graph input (or overridable block) `name`; None for a type torch has no dtype for."""
        if name not in self.input_types:
            raise KeyError(f"{name!r} is not an input of this graph; it takes {self.input_names}")
        return _ORT_TO_TORCH.get(self.input_types[name])

    def _as_graph_dtype(self, name: str, value: torch.Tensor | np.ndarray) -> torch.Tensor:
        """`value` in the dtype the graph takes: int32 widens to int64 (exact, and what PyTorch accepts
        for ids); anything else that differs is refused here, by name, not by onnxruntime."""
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value if value.flags.writeable else value.copy())  # shares memory
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"input {name!r} must be a torch tensor or a numpy array, got {type(value).__name__}")
        expected = self.input_dtype(name)
        if expected is None or value.dtype == expected:
            return value
        if value.dtype == torch.int32 and expected == torch.int64:
            return value.to(torch.int64)
        if name == "adapter_ids":
            raise ValueError(f"adapter_ids must be a 1-D int64 (or int32) tensor, one id per batch row; got "
                             f"{value.dtype} of shape {tuple(value.shape)}; build them with miss_compile.adapter_ids_for")
        raise TypeError(f"input {name!r} is {value.dtype}, and the graph takes {expected} "
                        f"({self.input_types[name]}); cast it with .to({expected})")

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
    device: str = "auto",
    session_options: ort.SessionOptions | None = None,
    io_binding: bool | None = None,
) -> MissSession:
    """An onnxruntime session on `device`: "auto" (CUDA when its provider can start here, else the
    CPU, quietly), "cuda" (falls back to the CPU with one RuntimeWarning naming why) or "cpu". The
    choice is `session.device` / `session.providers`.

    onnxruntime warns once per overridable initializer (every MiSS block of an unmerged graph) at its
    default log level (2, warnings); sessions made here log from level 3 (errors) unless
    `session_options.log_severity_level` asks for more (0 or 1). On CUDA runs always use IO binding
    on torch tensors; io_binding=True uses it on the CPU too."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    providers = _providers("cuda" if device == "auto" else device)
    unavailable = None if device == "cpu" else _cuda_unavailable()
    if unavailable is not None:
        if device == "cuda":
            _warn_cpu_fallback(unavailable)
        logger.info("onnxruntime runs %s on the CPU: %s", path, unavailable)
        providers = _providers("cpu")
    options = session_options or ort.SessionOptions()
    if options.log_severity_level in (-1, 2):  # unset (the default logger's 2) or warnings: one per block
        options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=providers)
    if len(providers) > 1 and session.get_providers()[0] != "CUDAExecutionProvider":
        message = "the CUDA provider did not load (CUDA/cuDNN libraries missing; onnxruntime's error above names them)"
        if device == "cuda":
            _warn_cpu_fallback(message)
        logger.info("onnxruntime runs %s on the CPU: %s", path, message)
    return MissSession(session, io_binding=bool(io_binding), stack_rows=_stack_rows(path, session))


def _stack_rows(path: Path, session: ort.InferenceSession) -> int | None:
    """Rows of the graph's default stacks (read from the file: the session shows a symbolic dim)."""
    if not any(is_stack_input(i.name) for i in session.get_overridable_initializers()):
        return None
    graph = onnx.load(str(path), load_external_data=False).graph
    rows = [tensor.dims[0] for tensor in graph.initializer if is_stack_input(tensor.name)]
    return min(rows) if rows else None
