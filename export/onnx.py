"""export_onnx: a MiSS model (ours or PEFT's) to merged or unmerged ONNX, validated on onnxruntime.

merged:   adapters folded into W and the layers unwrapped: the base model's graph and cost.
unmerged: each adapted Linear keeps W and its MiSS block apart; blocks are overridable
          initializers (graph inputs with defaults) named `<module>.miss_block.<adapter>`, so an
          `.onnx_adapter` file or a per-run feed swaps the adapter without re-exporting.
stacked:  kwargs hold `adapter_ids` (a model after miss_compile.stack_adapters): `adapter_ids` is a
          graph input [batch], and each layer's stack an overridable initializer
          `<module>.miss_stack` [adapters, r, out] whose first dim is symbolic, so a stack with
          more adapters (export.write_onnx_stack) runs on the same graph.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import torch
from torch import nn

from miss_compile.files import write_files_atomically
from miss_compile.inject import merge_adapters
from miss_compile.peft_compat import from_peft, named_miss_layers
from miss_compile.stacked import has_stacks, refresh_stacks

from .functions import group_into_functions
from .translation import OPSET, TRANSLATIONS

__all__ = ["export_onnx", "ExportResult", "BLOCK_MARKER", "STACK_SUFFIX", "IR_VERSION"]

logger = logging.getLogger(__name__)

BLOCK_MARKER = ".miss_block."
STACK_SUFFIX = ".miss_stack"
IR_VERSION = 10  # what torch's exporter writes; onnxruntime 1.31 rejects onnx 1.23's default (14)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass
class ExportResult:
    path: Path
    merged: bool
    nodes: int
    bytes: int
    seconds: float
    block_inputs: list[str] = field(default_factory=list)
    max_abs_error: float | None = None
    max_rel_error: float | None = None

    def __str__(self) -> str:
        kind = "merged" if self.merged else f"unmerged, {len(self.block_inputs)} overridable blocks"
        error = "" if self.max_abs_error is None else (
            f", onnxruntime vs torch max abs {self.max_abs_error:.2e} rel {self.max_rel_error:.2e}")
        return f"{self.path}: {kind}, {self.nodes} nodes, {self.bytes / 1e6:.1f} MB, {self.seconds:.1f}s{error}"


def prepare(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """The module that is exported: a copy, our layers (PEFT's swapped), eval mode, no KV cache, and
    every disabled layer unmerged (what PEFT's forward does first), so the copy computes exactly
    what the model's forward would."""
    prepared = from_peft(model)
    prepared.eval()
    if dtype is not None:
        prepared.to(dtype)
    if getattr(prepared, "config", None) is not None and hasattr(prepared.config, "use_cache"):
        prepared.config.use_cache = False  # no past-key-values export yet: outputs are tensors only
    for name, layer in named_miss_layers(prepared).items():
        if layer.disable_adapters and layer.merged:
            try:
                layer.unmerge()
            except ValueError as error:
                raise ValueError(f"layer {name!r} is merged while its adapters are disabled, and cannot be "
                                 f"unmerged: {error}") from None
    return prepared


def fold_adapters(prepared: nn.Module) -> None:
    """Merged export: adapters folded into W (a weight other modules read too gets its own merged
    copy; theirs stays) and each layer unwrapped to its base layer. `prepared` is a copy (prepare)."""

    def unwrap(name: str, layer: nn.Module) -> None:
        parent_name, _, child_name = name.rpartition(".")
        setattr(prepared.get_submodule(parent_name), child_name, layer.base_layer)

    for name, layer in named_miss_layers(prepared).items():
        if layer.disable_adapters:  # its output is the base layer's (prepare unmerged it)
            unwrap(name, layer)
    if named_miss_layers(prepared):
        with _quiet("miss_compile.inject"):  # its warnings speak of the user's model; this is a copy
            merge_adapters(prepared)
    for name, layer in named_miss_layers(prepared).items():
        unwrap(name, layer)


def _dynamic_dims(value: torch.Tensor, name: str = "") -> dict[int, str]:
    """Batch (dim 0) and sequence (dim 1); a float input's last dim is features and stays static
    (ids and masks [batch, seq], hidden states [batch, seq, features], rows [batch, features])."""
    features = value.is_floating_point() and "mask" not in name
    rank = value.dim() - 1 if features else value.dim()
    return {dim: label for dim, label in ((0, "batch"), (1, "sequence")) if dim < rank}


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Batch and sequence of every tensor input are dynamic (see _dynamic_dims)."""
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    shapes: dict[str, Any] = {}
    for name, value in bound.items():
        dims = _dynamic_dims(value, name) if isinstance(value, torch.Tensor) else {}
        if any(value.shape[dim] < 2 for dim in dims):
            # torch.export specializes sizes 0 and 1: the graph would only take that size.
            raise ValueError(
                f"example input {name!r} has shape {tuple(value.shape)}; a dynamic export needs batch and "
                "sequence sizes >= 2 in the example (or pass dynamic=False)"
            )
        shapes[name] = dims or None
    return shapes


def _expose_blocks(program: Any) -> list[str]:
    """Make every MiSS block and stack an overridable initializer (graph input with a default);
    a stack's first dim (how many adapters) becomes symbolic."""
    graph = program.model.graph
    names = [name for name in graph.initializers if BLOCK_MARKER in name or name.endswith(STACK_SUFFIX)]
    for name in names:
        value = graph.initializers[name]
        if name.endswith(STACK_SUFFIX):
            value.shape = ir.Shape(["adapters", *value.shape[1:]])
        graph.inputs.append(value)
    return names


def _named_inputs(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Every input by name, `**kwargs` of the model's forward spread out (HF models take them so)."""
    parameters = inspect.signature(model.forward).parameters
    inputs: dict[str, Any] = {}
    for name, value in inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments.items():
        if parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            inputs.update(value)
        else:
            inputs[name] = value
    return inputs


def _take_adapter_ids(prepared: nn.Module, inputs: dict[str, Any]) -> None:
    """Give `prepared` (a copy) a forward whose signature names every input, adapter_ids included,
    so torch.export makes adapter_ids a graph input; the stacking pre-hook pops it before forward."""
    if not has_stacks(prepared):
        raise ValueError(f"adapter_ids given, but {type(prepared).__name__} has no adapter stacks; "
                         "call miss_compile.stack_adapters(model) before export_onnx")
    model_forward = type(prepared).forward

    def forward(**named: Any) -> Any:
        return model_forward(prepared, **named)

    forward.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in inputs])
    prepared.forward = forward


def _check_writable(path: Path) -> None:
    """Fail before the (slow) export when `path` cannot be written."""
    if path.is_dir():
        raise IsADirectoryError(f"cannot export to {path}: it is a folder; pass a file path such as {path / 'model.onnx'}")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot export to {path}: {folder} is a file, not a folder; choose another path")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"cannot export to {path}: {folder} is not writable; choose a writable folder")


def _save_atomically(program: Any, path: Path, external_data: bool,
                     check: Callable[[Path], None] | None = None) -> None:
    """Check the staged file, then move it into place: a failure (validation included) leaves no
    partial file and any earlier file at `path` as it was."""

    def write(staged: Path) -> None:
        program.model.ir_version = IR_VERSION
        program.save(staged, external_data=external_data)
        proto = onnx.load(str(staged), load_external_data=False)
        if group_into_functions(proto):
            onnx.save(proto, str(staged))  # external tensors keep pointing at the same data file
        onnx.checker.check_model(str(staged))
        if check is not None:
            check(staged)

    write_files_atomically(path, write)


def export_onnx(
    model: nn.Module,
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
    path: str | os.PathLike = "model.onnx",
    merged: bool = False,
    opset: int = OPSET,
    dynamic: bool = True,
    dtype: torch.dtype | None = None,
    external_data: bool | None = None,
    validate: bool = True,
) -> ExportResult:
    """Export `model(*args, **kwargs)` to `path`; validates on onnxruntime unless validate=False.

    external_data: None writes weights to `<path>.data` only past 2 GB (protobuf's limit).
    """
    if opset < OPSET:
        raise ValueError(f"opset={opset}: the MiSS translations need opset >= {OPSET} (Pad with axes)")
    start = time.perf_counter()
    kwargs = dict(kwargs or {})
    path = Path(path)
    _check_writable(path)
    if "adapter_names" in kwargs:
        raise ValueError("export_onnx takes adapter_ids, not adapter_names: names would be traced into constant ids. "
                         "Pass adapter_ids=miss_compile.adapter_ids_for(model, names)")
    stacked = "adapter_ids" in kwargs
    if stacked and merged:
        raise ValueError("adapter_ids given with merged=True; each batch row has its own adapter, so a stacked "
                         "export is unmerged: pass merged=False")
    if stacked:
        refresh_stacks(model)  # torch.export traces the stacks as they are: never a stale one
    prepared = prepare(model, dtype)
    if stacked:
        kwargs, args = _named_inputs(prepared, args, kwargs), ()
        _take_adapter_ids(prepared, kwargs)
    args, kwargs = _cast_inputs(args, dtype), _cast_inputs(kwargs, dtype)
    # The outputs to validate against come from the adapters as they run, before any merge: a
    # merge that changed what it must not (a weight read elsewhere too) then fails validation.
    expected = _expected_outputs(prepared, args, kwargs, dynamic) if validate else None
    if merged and named_miss_layers(prepared):
        fold_adapters(prepared)
    size = sum(p.numel() * p.element_size() for p in prepared.parameters())
    if external_data is None:
        external_data = size > 2**31 - 2**26  # protobuf's 2 GB, with headroom for the graph
    with warnings.catch_warnings():
        # The stacking hook hands adapter_ids to the layers as attributes: by design, not a lost buffer.
        warnings.filterwarnings("ignore", message=r"The tensor attributes .*adapter_ids")
        program = torch.onnx.export(
            prepared,
            args,
            verbose=False,
            kwargs=kwargs,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=_dynamic_shapes(prepared, args, kwargs) if dynamic else None,
            custom_translation_table=TRANSLATIONS,
            optimize=False,  # blocks become graph inputs first, so constant folding keeps them apart
            external_data=external_data,
        )
    block_inputs = [] if merged else _expose_blocks(program)
    with _quiet("onnx_ir.passes.common.initializer_deduplication"):  # blocks stay apart by design
        program.optimize()
    errors: list[float] = []

    def check(staged: Path) -> None:
        if validate:
            from .validate import validate_export

            errors.extend(validate_export(prepared, staged, args, kwargs, dynamic, expected))

    _save_atomically(program, path, external_data, check)
    result = ExportResult(
        path=path,
        merged=merged,
        nodes=len(program.model.graph),
        bytes=path.stat().st_size + sum(f.stat().st_size for f in path.parent.glob(path.name + ".data")),
        seconds=time.perf_counter() - start,
        block_inputs=block_inputs,
    )
    if errors:
        result.max_abs_error, result.max_rel_error = errors
    result.seconds = time.perf_counter() - start
    logger.info("%s", result)
    return result


def _expected_outputs(prepared: nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> list:
    from .validate import expected_outputs

    return expected_outputs(prepared, args, kwargs, dynamic)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    quieted = logging.getLogger(logger_name)
    level = quieted.level
    quieted.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quieted.setLevel(level)


def _cast_inputs(values: Any, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return values
    cast = lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
    if isinstance(values, dict):
        return {k: cast(v) for k, v in values.items()}
    return tuple(cast(v) for v in values)

