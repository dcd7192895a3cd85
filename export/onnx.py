"""export_onnx: a MiSS model (ours or PEFT's) to merged or unmerged ONNX, validated on onnxruntime.

merged:   adapters folded into W and the layers unwrapped: the base model's graph and cost.
unmerged: each adapted Linear keeps W and its MiSS block apart; blocks are overridable
          initializers (graph inputs with defaults) named `<module>.miss_block.<adapter>`, so an
          `.onnx_adapter` file or a per-run feed swaps the adapter without re-exporting.
stacked:  kwargs hold `adapter_ids` (a model after miss_compile.stack_adapters): `adapter_ids` is a
          graph input [batch], and each layer's stack an overridable initializer
          `<module>.miss_stack` [adapters, r, out] whose first dim is symbolic, so a stack with
          more adapters (export.write_onnx_stack) runs on the same graph.

The steps work on one representation, the onnx_ir model torch.onnx.export returns: trace, expose
the blocks, optimize, name the outputs, group each MiSS layer into a local function, record the
provenance, check; then one save into a staging folder, validated there and moved into place.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch
from torch import nn

from miss_compile.files import write_files_atomically
from miss_compile.inject import merge_adapters
from miss_compile.peft_compat import from_peft, named_miss_layers
from miss_compile.stacked import has_stacks, refresh_stacks

from . import inputs
from . import validate as validation
from .causal_lm import cache_export
from .functions import group_into_functions
from .names import BLOCK_MARKER, STACK_SUFFIX, is_overridable_input, is_stack_input
from .provenance import METADATA_PREFIX, provenance
from .translation import OPSET, TRANSLATIONS

__all__ = ["export_onnx", "export_causal_lm", "ExportResult", "BLOCK_MARKER", "STACK_SUFFIX", "IR_VERSION", "METADATA_PREFIX",
           "prepare", "fold_adapters", "provenance"]

logger = logging.getLogger(__name__)

IR_VERSION = 10  # what torch's exporter writes; onnxruntime 1.31 rejects onnx 1.23's default (14)
_PROTOBUF_LIMIT = 2**31 - 2**26  # protobuf's 2 GB, with headroom for the graph


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
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        kind = "merged" if self.merged else f"unmerged, {len(self.block_inputs)} overridable blocks"
        error = "" if self.max_abs_error is None else (
            f", onnxruntime vs torch max abs {self.max_abs_error:.2e} rel {self.max_rel_error:.2e}")
        return f"{self.path}: {kind}, {self.nodes} nodes, {self.bytes / 1e6:.1f} MB, {self.seconds:.1f}s{error}"


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
    *,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_shapes: Any = None,
    metadata: Mapping[str, str] | None = None,
    validation_inputs: Sequence[Mapping[str, Any]] = (),
    with_past: bool = False,
) -> ExportResult:
    """Export `model(*args, **kwargs)` to `path`; validates on onnxruntime unless validate=False.

    with_past=True: a decoder-only causal LM with its KV cache (export_causal_lm below: the
        graph builds its own example inputs, so args, kwargs other than adapter_ids, and the naming and
        shape options are refused).

    Every tensor in args / kwargs (attention_mask, token_type_ids, position_ids, ... as passed) is a
    graph input, batch and sequence dynamic; outputs take the model's own names (`logits`, ...) when it
    returns a ModelOutput or dict. Validation runs the example, left- and right-padded batches when an
    `attention_mask` is given (comparing the positions it keeps: see export.validate), the inputs at
    another size, and `validation_inputs`.

    external_data: None writes weights to `<path>.data` only past 2 GB (protobuf's limit).
    input_names / output_names: names for the graph's inputs (the tensors of args then kwargs, lists
        flattened, in the order passed) and outputs (the model's output tensors in order).
    dynamic_shapes: torch.export's dynamic_shapes, in place of the batch / sequence rule (dynamic is then
        ignored); validation then runs no automatic other size: pass those sizes as validation_inputs.
    metadata: extra metadata_props (str -> str) beside the provenance (keys starting `miss_compile.`).
    validation_inputs: more kwargs sets (each complete, like `kwargs`) validated before saving.
    """
    if with_past:
        return _export_with_past(model, args, kwargs, path, merged, opset, dynamic, dtype, external_data, validate,
                                 input_names, output_names, dynamic_shapes, metadata, validation_inputs)
    start = time.perf_counter()
    path, kwargs = Path(path), dict(kwargs or {})
    _check_request(path, opset, kwargs, merged, metadata)
    prepared, args, kwargs = _prepare_with_inputs(model, args, kwargs, dtype)
    _check_names("input_names", input_names, len(inputs.graph_input_leaves(args, kwargs)), "tensors in args and kwargs")
    _check_names("output_names", output_names, None, "outputs")
    extra = [inputs.cast_inputs(dict(case), dtype) for case in validation_inputs]
    cases = validation.validation_cases(prepared, args, kwargs, dynamic and dynamic_shapes is None, extra) if validate else []
    # The outputs to validate against come from the adapters as they run, before any merge: a
    # merge that changed what it must not (a weight read elsewhere too) then fails validation.
    expected = validation.expected_outputs(prepared, cases)
    properties = {**provenance(model, prepared, merged, "adapter_ids" in kwargs), **(metadata or {})}
    if merged and named_miss_layers(prepared):
        fold_adapters(prepared)
    if external_data is None:
        external_data = sum(p.numel() * p.element_size() for p in prepared.parameters()) > _PROTOBUF_LIMIT
    if dynamic_shapes is None and dynamic:
        dynamic_shapes = inputs.dynamic_shapes(prepared, args, kwargs)
    program = _trace(prepared, args, kwargs, opset, dynamic_shapes, external_data, input_names, output_names)
    block_inputs = _build(program, merged, output_names, properties)
    errors: list[float] = []

    def save(staged: Path) -> None:
        program.save(staged, external_data=external_data)
        if cases:
            errors.extend(validation.validate_export(prepared, staged, cases, expected))

    write_files_atomically(path, save)
    result = _result(program.model.graph, path, merged, block_inputs, errors, time.perf_counter() - start)
    logger.info("%s", result)
    return result


def _check_request(path: Path, opset: int, kwargs: dict[str, Any], merged: bool,
                   metadata: Mapping[str, str] | None) -> None:
    """Refuse what cannot be exported before the (slow) work starts."""
    if opset < OPSET:
        raise ValueError(f"opset={opset}: the MiSS translations need opset >= {OPSET} (Pad with axes)")
    _check_writable(path)
    if "adapter_names" in kwargs:
        raise ValueError("export_onnx takes adapter_ids, not adapter_names: names would be traced into constant ids. "
                         "Pass adapter_ids=miss_compile.adapter_ids_for(model, names)")
    if "adapter_ids" in kwargs and merged:
        raise ValueError("adapter_ids given with merged=True; each batch row has its own adapter, so a stacked "
                         "export is unmerged: pass merged=False")
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata {key!r}: {value!r}: metadata_props are str -> str; convert the value with str()")
        if key.startswith(METADATA_PREFIX):
            raise ValueError(f"metadata key {key!r}: keys starting {METADATA_PREFIX!r} are the export's provenance; "
                             "choose another key")


def _check_names(what: str, names: list[str] | None, count: int | None, counted: str) -> None:
    """One distinct name per graph input or output (count None: not known yet, distinct only)."""
    if names is None or (len(set(names)) == len(names) and count in (None, len(names))):
        return
    raise ValueError(f"{what} has {len(names)} names ({len(set(names))} distinct) for {count or 'its'} {counted}; "
                     f"give one distinct name each, in order (lists flattened), or leave {what} out")


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


def prepare(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """The module that is exported: a copy, our layers (PEFT's swapped), eval mode, no KV cache, and
    every disabled layer unmerged (what PEFT's forward does first), so the copy computes exactly
    what the model's forward would."""
    prepared = from_peft(model)
    prepared.eval()
    if dtype is not None:
        prepared.to(dtype)
    if getattr(prepared, "config", None) is not None and hasattr(prepared.config, "use_cache"):
        prepared.config.use_cache = False  # past key values are the caller's inputs (a wrapper), not outputs here
    for name, layer in named_miss_layers(prepared).items():
        if layer.disable_adapters and layer.merged:
            try:
                layer.unmerge()
            except ValueError as error:
                raise ValueError(f"layer {name!r} is merged while its adapters are disabled, and cannot be "
                                 f"unmerged: {error}") from None
    return prepared


def _prepare_with_inputs(model: nn.Module, args: tuple, kwargs: dict[str, Any],
                         dtype: torch.dtype | None) -> tuple[nn.Module, tuple, dict[str, Any]]:
    """The prepared copy and the inputs it is traced with (cast to `dtype`; a stacked model's by name)."""
    stacked = "adapter_ids" in kwargs
    if stacked:
        refresh_stacks(model)  # torch.export traces the stacks as they are: never a stale one
    prepared = prepare(model, dtype)
    if stacked:
        kwargs, args = inputs.named_inputs(prepared, args, kwargs), ()
        _take_adapter_ids(prepared, kwargs)
    return prepared, inputs.cast_inputs(args, dtype), inputs.cast_inputs(kwargs, dtype)


def _take_adapter_ids(prepared: nn.Module, named: dict[str, Any]) -> None:
    """Give `prepared` (a copy) a forward whose signature names every input, adapter_ids included,
    so torch.export makes adapter_ids a graph input; the stacking pre-hook pops it before forward."""
    if not has_stacks(prepared):
        raise ValueError(f"adapter_ids given, but {type(prepared).__name__} has no adapter stacks; "
                         "call miss_compile.stack_adapters(model) before export_onnx")
    model_forward = type(prepared).forward

    def forward(**given: Any) -> Any:
        return model_forward(prepared, **given)

    forward.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in named])
    prepared.forward = forward


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


def _trace(prepared: nn.Module, args: tuple, kwargs: dict[str, Any], opset: int, dynamic_shapes: Any,
           external_data: bool, input_names: list[str] | None, output_names: list[str] | None) -> Any:
    """torch.onnx.export (dynamo) with the MiSS translations, not yet optimized: blocks become graph
    inputs first (_expose_blocks), so constant folding keeps them apart."""
    with warnings.catch_warnings():
        # The stacking hook hands adapter_ids to the layers as attributes: by design, not a lost buffer.
        warnings.filterwarnings("ignore", message=r"The tensor attributes .*adapter_ids")
        return torch.onnx.export(
            prepared,
            args,
            verbose=False,
            kwargs=kwargs,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            custom_translation_table=TRANSLATIONS,
            optimize=False,
            external_data=external_data,
            input_names=input_names,
            output_names=output_names,
        )


def _build(program: Any, merged: bool, output_names: list[str] | None, properties: dict[str, str]) -> list[str]:
    """The traced model made the one that is saved, in place: blocks exposed (unmerged), optimized,
    outputs named, layers grouped into local functions, provenance recorded, checked. Returns the
    overridable block inputs."""
    _check_names("output_names", output_names, len(program.model.graph.outputs), "outputs of the traced graph")
    block_inputs = [] if merged else _expose_blocks(program.model.graph)
    with _quiet("onnx_ir.passes.common.initializer_deduplication"):  # blocks stay apart by design
        program.optimize()
    if output_names is None:
        _name_outputs(program)
    _finish(program.model, properties)
    return block_inputs


def _result(graph: ir.Graph, path: Path, merged: bool, block_inputs: list[str], errors: list[float],
            seconds: float) -> ExportResult:
    data = path.parent / (path.name + ".data")
    result = ExportResult(
        path=path,
        merged=merged,
        nodes=len(graph),
        bytes=path.stat().st_size + (data.stat().st_size if data.is_file() else 0),
        seconds=seconds,
        block_inputs=block_inputs,
        input_names=[value.name for value in graph.inputs if not is_overridable_input(value.name)],
        output_names=[value.name for value in graph.outputs],
    )
    if errors:
        result.max_abs_error, result.max_rel_error = errors
    return result


def _expose_blocks(graph: ir.Graph) -> list[str]:
    """Make every MiSS block and stack an overridable initializer (graph input with a default);
    a stack's first dim (how many adapters) becomes symbolic."""
    names = [name for name in graph.initializers if is_overridable_input(name)]
    for name in names:
        value = graph.initializers[name]
        if is_stack_input(name):
            value.shape = ir.Shape(["adapters", *value.shape[1:]])
        graph.inputs.append(value)
    return names


def _output_names(spec: Any, prefix: str = "") -> list[str | None]:
    """Names for the leaves of an output pytree spec: keys of dicts / ModelOutputs joined by '.',
    positions of sequences inside them; None for leaves not under a key (a plain tuple output)."""
    if spec.is_leaf():
        return [prefix or None]
    children = spec.children()
    keys = spec.context if isinstance(spec.context, list) and len(spec.context) == len(children) else None
    if keys is None or not all(isinstance(key, str) for key in keys):
        keys = [str(index) for index in range(len(children))] if prefix else [""] * len(children)
    names: list[str | None] = []
    for key, child in zip(keys, children, strict=True):
        names += _output_names(child, f"{prefix}.{key}" if prefix and key else key)
    return names


def _name_outputs(program: Any) -> None:
    """Graph outputs take the model's output names (`logits`, `last_hidden_state`, ...) where it returns
    a dict or ModelOutput; a plain tuple's outputs keep the exporter's names."""
    graph = program.model.graph
    names = _output_names(program.exported_program.call_spec.out_spec)
    if len(names) != len(graph.outputs):  # a leaf that is not a tensor (None, int): positions unknown
        return
    taken = set(ir.convenience.create_value_mapping(graph))
    renamed: set[ir.Value] = set()
    for value, name in zip(graph.outputs, names, strict=True):
        if name and name not in taken and value not in renamed and not value.is_graph_input() \
                and not value.is_initializer():
            value.name = name
            taken.add(name)
            renamed.add(value)


def _finish(onnx_model: ir.Model, properties: dict[str, str]) -> None:
    """Local functions, provenance and the IR version onnxruntime takes; then onnx's checker."""
    group_into_functions(onnx_model)
    onnx_model.metadata_props.update(properties)
    onnx_model.ir_version = IR_VERSION
    ir.passes.common.CheckerPass()(onnx_model)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    quieted = logging.getLogger(logger_name)
    level = quieted.level
    quieted.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quieted.setLevel(level)


def _export_with_past(model: nn.Module, args: tuple, kwargs: dict[str, Any] | None, path: str | os.PathLike,
                      merged: bool, opset: int, dynamic: bool, dtype: torch.dtype | None,
                      external_data: bool | None, validate: bool, *options: Any) -> ExportResult:
    kwargs = dict(kwargs or {})
    adapter_ids = kwargs.pop("adapter_ids", None)
    if args or kwargs or not dynamic or any(option for option in options):
        raise ValueError("export_onnx(with_past=True) builds the KV-cache graph's inputs itself (input_ids, "
                         "attention_mask, position_ids, past_key_values.{i}.key/value): pass only the model, path, "
                         "merged, dtype, opset, external_data, validate and kwargs={'adapter_ids': ...} for stacks")
    return export_causal_lm(model, path, merged=merged, adapter_ids=adapter_ids, dtype=dtype, opset=opset,
                            external_data=external_data, validate=validate)


def export_causal_lm(
    model: nn.Module,
    path: str | os.PathLike = "model.onnx",
    merged: bool = False,
    adapter_ids: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    opset: int = OPSET,
    external_data: bool | None = None,
    validate: bool = True,
) -> ExportResult:
    """A decoder-only causal LM to one ONNX graph with its KV cache (the graph: export.causal_lm), validated
    on onnxruntime at past length 0 (a left-padded prefill), at sequence 1 (decode) and at other sizes
    unless validate=False. `adapter_ids` (stacked models): an example [batch] of ids, a graph input."""
    request = cache_export(model, adapter_ids, dtype)
    with warnings.catch_warnings():
        # torch names a dim once and warns for every other input that shares it: by design here
        warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
        return export_onnx(
            request.module, kwargs=request.example, path=path, merged=merged, opset=opset, dtype=dtype,
            external_data=external_data, validate=validate, input_names=request.input_names,
            output_names=request.output_names, dynamic_shapes=request.dynamic_shapes,
            validation_inputs=request.validation_inputs,
        )
