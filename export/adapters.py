"""`.onnx_adapter` files: a MiSS adapter as onnxruntime's AdapterFormat, named like the unmerged graph's blocks;
or every layer's adapter stack (`<module>.miss_stack`), for graphs exported with adapter_ids."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from miss_compile.checkpoint import CONFIG_NAME, read_adapter
from miss_compile.checkpoint_compat import recorded_base_class
from miss_compile.files import write_atomically
from miss_compile.peft_compat import layers_with, model_root, named_miss_layers
from miss_compile.saved_modules import saved_tensors
from miss_compile.stacked import refresh_stacks, stacked_layers

from .names import block_input_name, is_block_input, is_stack_input, split_block_input, stack_input_name
from .provenance import (
    PREDATES_WARNING,
    exported_class,
    predates_saved_modules,
    saved_modules_refusal,
)

__all__ = ["write_onnx_adapter", "write_onnx_stack", "adapter_parameters", "stack_parameters",
           "read_onnx_adapter", "signature", "adapter_fit_problems", "NO_BLOCKS"]

logger = logging.getLogger(__name__)

_ONNX_TO_NUMPY = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
                  onnx.TensorProto.DOUBLE: np.float64}

# Why an adapter file cannot apply to a graph without overridable inputs (write_onnx_adapter, sessions).
NO_BLOCKS = ("has no overridable blocks: it is a merged export (adapters folded into its weights) or has no "
             "MiSS layers; adapter files need a graph exported with merged=False (miss-export --unmerged)")

# name -> (shape, dtype); a str (or None) dim is symbolic and fits any size; dtype None: not checked.
Signature = dict[str, tuple[tuple, object]]


def adapter_parameters(adapter: str | os.PathLike | nn.Module, adapter_name: str = "default",
                       as_name: str | None = None) -> dict[str, torch.Tensor]:
    """Graph input name -> block, from a PEFT-format folder or a model carrying `adapter_name`;
    named `<module>.miss_block.<as_name>` (default: adapter_name), the name the graph was exported with."""
    graph_name = adapter_name if as_name is None else as_name
    if isinstance(adapter, nn.Module):
        layers = layers_with(adapter, adapter_name)
        if not layers:
            raise ValueError(f"the model has no adapter named {adapter_name!r}")
        heads = saved_tensors(model_root(adapter), adapter_name)
        if heads:
            # The graph keeps heads (modules_to_save) as plain weights: a file of blocks alone would
            # serve the new blocks with the exported adapter's head.
            raise ValueError(
                f"adapter {adapter_name!r} trains whole modules too (modules_to_save: {sorted(heads)}), which an "
                ".onnx_adapter cannot carry: export one graph per adapter (export_onnx) instead")
        return {block_input_name(n, graph_name): layer.miss_block[adapter_name].detach() for n, layer in layers.items()}
    _, blocks = read_adapter(adapter)
    return {block_input_name(name, graph_name): block for name, block in blocks.items()}


def _checked_graph_blocks(model_path: Path, trained: str | os.PathLike | nn.Module | None
                          ) -> dict[str, tuple[tuple[int, ...], type]]:
    """The overridable blocks of the graph at `model_path`, once the graph may take an adapter file at all
    (not for trained heads, nor a merged graph); warns where the graph cannot tell or another class trained it."""
    graph = onnx.load(str(model_path), load_external_data=False)
    metadata = {p.key: p.value for p in graph.metadata_props}
    refusal = saved_modules_refusal(metadata, str(model_path))
    if refusal:
        raise ValueError(f"write_onnx_adapter: {refusal}")
    if predates_saved_modules(metadata):
        logger.warning("write_onnx_adapter: %s %s", model_path, PREDATES_WARNING)
    if trained is not None:
        _warn_if_other_base(trained, metadata, model_path)
    blocks = _graph_blocks(graph, model_path)
    if not blocks:
        raise ValueError(f"{model_path} {NO_BLOCKS}")
    return blocks


def _graph_blocks(model: onnx.ModelProto, model_path: Path) -> dict[str, tuple[tuple[int, ...], type]]:
    initializers = {i.name: i for i in model.graph.initializer}
    blocks = {}
    for graph_input in model.graph.input:
        if graph_input.name in initializers:
            tensor = initializers[graph_input.name]
            if tensor.data_type not in _ONNX_TO_NUMPY:
                raise NotImplementedError(
                    f"{model_path}: graph input {graph_input.name!r} is {onnx.TensorProto.DataType.Name(tensor.data_type)}, "
                    f"and .onnx_adapter files are written as {sorted(onnx.TensorProto.DataType.Name(t) for t in _ONNX_TO_NUMPY)} "
                    "only; export the graph in one of those dtypes"
                )
            blocks[graph_input.name] = (tuple(tensor.dims), _ONNX_TO_NUMPY[tensor.data_type])
    return blocks


def write_onnx_adapter(
    adapter: str | os.PathLike | nn.Module,
    path: str | os.PathLike,
    model_path: str | os.PathLike | None = None,
    adapter_name: str = "default",
    as_name: str | None = None,
) -> Path:
    """Write an `.onnx_adapter` whose parameters are named like the unmerged graph's blocks
    (`<module>.miss_block.<as_name>`; as_name defaults to adapter_name, the adapter read from a model:
    set it to the adapter name the graph was exported with). With `model_path`, names, shapes and
    coverage are checked against that graph's overridable blocks and dtypes follow it (fp16 exports);
    without it the blocks are written as fp32, and sessions check them when they load the file."""
    return _write(adapter_parameters(adapter, adapter_name, as_name), path, model_path, trained=adapter)


def _warn_if_other_base(adapter: str | os.PathLike | nn.Module, metadata: dict[str, str],
                        model_path: str | os.PathLike) -> None:
    """One WARNING when the adapter was trained on another model class than the graph was exported from
    (equal shapes fit: a Qwen2 adapter on a Llama graph), as miss_compile.load_adapter warns."""
    if isinstance(adapter, nn.Module):
        trained_on = type(model_root(adapter)).__name__
    else:
        trained_on = recorded_base_class(json.loads((Path(adapter) / CONFIG_NAME).read_text()))
    exported_from = exported_class(metadata)
    if trained_on and exported_from and trained_on != exported_from:
        logger.warning(
            "write_onnx_adapter: the adapter was trained on a %s and is written for %s, exported from a %s. Its "
            "shapes fit, so it is written, but its blocks were trained against another model's weights: check that "
            "this is the graph you meant.", trained_on, model_path, exported_from)


def stack_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Graph input name -> stack [adapters, r, out], for every stacked layer of `model` (restacked
    first when blocks changed since stack_adapters: a stack file never holds stale blocks)."""
    refresh_stacks(model)
    stacked = {id(layer) for layer in stacked_layers(model)}
    layers = {name: layer for name, layer in named_miss_layers(model).items() if id(layer) in stacked}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapter stacks; call miss_compile.stack_adapters(model) first")
    return {stack_input_name(name): layer.miss_stack for name, layer in layers.items()}


def write_onnx_stack(model: nn.Module, path: str | os.PathLike, model_path: str | os.PathLike | None = None) -> Path:
    """Write every layer's adapter stack as an `.onnx_adapter` for a graph exported with adapter_ids.
    The graph's stacks take any number of adapters: adding one is a new stack file, not a new export.
    With `model_path`, names and the (r, out) of each stack are checked against the graph."""
    return _write(stack_parameters(model), path, model_path)


def read_onnx_adapter(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every parameter of an `.onnx_adapter`, name -> a private copy (nothing maps the file afterwards)."""
    parameters = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    return {name: np.array(value.numpy(), copy=True) for name, value in parameters.items()}


_NUMPY_TO_ORT = {np.dtype(np.float32): "tensor(float)", np.dtype(np.float16): "tensor(float16)",
                 np.dtype(np.float64): "tensor(double)", np.dtype(np.int64): "tensor(int64)",
                 np.dtype(np.int32): "tensor(int32)"}


def signature(parameters: dict[str, np.ndarray]) -> Signature:
    """Name -> (shape, onnxruntime type such as 'tensor(float)'), to compare with a session's inputs."""
    return {name: (tuple(array.shape), _NUMPY_TO_ORT.get(array.dtype, str(array.dtype)))
            for name, array in parameters.items()}


def _free_stack_dims(graph: Signature) -> Signature:
    # a stack's first dim (how many adapters) is free: a stack file may hold more adapters than the export
    return {name: (("adapters", *shape[1:]) if is_stack_input(name) else shape, dtype)
            for name, (shape, dtype) in graph.items()}


def adapter_fit_problems(parameters: Signature, graph: Signature, partial: bool = False) -> list[str]:
    """Every way `parameters` (an adapter) does not fit `graph` (its overridable initializers), named.
    Missing graph blocks are a problem unless `partial` (they then run with the graph's defaults)."""
    missing, extra = sorted(set(graph) - set(parameters)), sorted(set(parameters) - set(graph))
    problems = [] if partial else [f"missing block for graph input {name!r}" for name in missing]
    problems += [f"{name!r} is not an overridable block of the graph" for name in extra]
    for name in sorted(set(graph) & set(parameters)):
        (shape, dtype), (expected_shape, expected_dtype) = parameters[name], graph[name]
        fits = len(shape) == len(expected_shape) and all(
            not isinstance(want, int) or got == want for got, want in zip(shape, expected_shape, strict=True))
        if not fits:
            problems.append(f"{name!r}: shape {shape}, the graph expects {expected_shape}")
        elif dtype is not None and expected_dtype is not None and dtype != expected_dtype:
            problems.append(f"{name!r}: dtype {dtype}, the graph expects {expected_dtype}")
    stack_sizes = {shape[0] for name, (shape, _) in parameters.items() if is_stack_input(name) and shape}
    if len(stack_sizes) > 1:
        problems.append(f"the stacks hold different numbers of adapters {sorted(stack_sizes)}; one id must mean "
                        "one adapter in every layer: write them together with write_onnx_stack")
    if extra and missing:
        problems += _naming_hints(extra, missing)
    return problems


def _naming_hints(extra: list[str], missing: list[str]) -> list[str]:
    """When names differ only by the adapter part (or blocks vs stacks), say which option fixes it."""
    written = dict(split_block_input(name) for name in extra if is_block_input(name))
    exported = dict(split_block_input(name) for name in missing if is_block_input(name))
    shared = set(written) & set(exported)
    hints = []
    if shared:
        file_names = sorted({written[m] for m in shared})
        graph_names = sorted({exported[m] for m in shared})
        hints.append(f"the file was written for adapter name(s) {file_names} while the graph was exported with "
                     f"{graph_names}: write it again with write_onnx_adapter(..., as_name={graph_names[0]!r}), or export "
                     f"the graph with the file's name (miss-export --adapter-name {file_names[0]})")
    if any(is_stack_input(n) for n in extra) and any(is_block_input(n) for n in missing):
        hints.append("the file holds adapter stacks (write_onnx_stack) but the graph has one block per layer: "
                     "use write_onnx_adapter for this graph, or export with adapter_ids for stacks")
    if any(is_block_input(n) for n in extra) and any(is_stack_input(n) for n in missing):
        hints.append("the file holds single-adapter blocks but the graph was exported with adapter_ids (stacks): "
                     "write the file with write_onnx_stack")
    return hints


def _write(parameters: dict[str, torch.Tensor], path: str | os.PathLike, model_path: str | os.PathLike | None,
           trained: str | os.PathLike | nn.Module | None = None) -> Path:
    """`trained`: the adapter the parameters come from, compared with the graph's base class."""
    if model_path is None:
        expected = {name: (tuple(block.shape), np.float32) for name, block in parameters.items()}
    else:
        expected = _checked_graph_blocks(Path(model_path), trained)
    graph = {name: (shape, None) for name, (shape, _) in expected.items()}  # dtypes follow the graph: cast below
    signature = {name: (tuple(block.shape), None) for name, block in parameters.items()}
    problems = adapter_fit_problems(signature, _free_stack_dims(graph))
    if problems:
        raise ValueError(f"adapter does not fit {model_path}:\n  " + "\n  ".join(problems))
    values = {
        name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(block.float().cpu().numpy().astype(expected[name][1])))
        for name, block in parameters.items()
    }
    adapter_format = ort.AdapterFormat()
    adapter_format.set_adapter_version(1)
    adapter_format.set_model_version(1)
    adapter_format.set_parameters(values)
    path = Path(path)
    write_atomically({path: adapter_format.export_adapter})
    return path
