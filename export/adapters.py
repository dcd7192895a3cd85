"""`.onnx_adapter` files: a MiSS adapter as onnxruntime's AdapterFormat, named like the unmerged graph's blocks;
or every layer's adapter stack (`<module>.miss_stack`), for graphs exported with adapter_ids."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from miss_compile.checkpoint import read_adapter
from miss_compile.files import stage_beside
from miss_compile.peft_compat import named_miss_layers
from miss_compile.stacked import stacked_layers

__all__ = ["write_onnx_adapter", "write_onnx_stack", "adapter_parameters", "stack_parameters"]

_ONNX_TO_NUMPY = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
                  onnx.TensorProto.DOUBLE: np.float64}


def adapter_parameters(adapter: str | os.PathLike | nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Graph input name -> block, from a PEFT-format folder or a model carrying `adapter_name`."""
    if isinstance(adapter, nn.Module):
        layers = {n: layer for n, layer in named_miss_layers(adapter).items() if adapter_name in layer.miss_block}
        if not layers:
            raise ValueError(f"the model has no adapter named {adapter_name!r}")
        return {f"{n}.miss_block.{adapter_name}": layer.miss_block[adapter_name].detach() for n, layer in layers.items()}
    _, blocks = read_adapter(adapter)
    return {f"{name}.miss_block.{adapter_name}": block for name, block in blocks.items()}


def _graph_blocks(model_path: Path) -> dict[str, tuple[tuple[int, ...], type]]:
    model = onnx.load(str(model_path), load_external_data=False)
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
) -> Path:
    """Write an `.onnx_adapter` whose parameters are named like the unmerged graph's blocks
    (`<module>.miss_block.<adapter_name>`). With `model_path`, names, shapes and coverage are
    checked against that graph's overridable blocks and dtypes follow it (fp16 exports);
    without it the blocks are written as fp32."""
    return _write(adapter_parameters(adapter, adapter_name), path, model_path)


def stack_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Graph input name -> stack [adapters, r, out], for every stacked layer of `model`."""
    stacked = {id(layer) for layer in stacked_layers(model)}
    layers = {name: layer for name, layer in named_miss_layers(model).items() if id(layer) in stacked}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapter stacks; call miss_compile.stack_adapters(model) first")
    return {f"{name}.miss_stack": layer.miss_stack for name, layer in layers.items()}


def write_onnx_stack(model: nn.Module, path: str | os.PathLike, model_path: str | os.PathLike | None = None) -> Path:
    """Write every layer's adapter stack as an `.onnx_adapter` for a graph exported with adapter_ids.
    The graph's stacks take any number of adapters: adding one is a new stack file, not a new export.
    With `model_path`, names and the (r, out) of each stack are checked against the graph."""
    return _write(stack_parameters(model), path, model_path, stacks=True)


def _write(parameters: dict[str, torch.Tensor], path: str | os.PathLike, model_path: str | os.PathLike | None,
           stacks: bool = False) -> Path:
    if model_path is None:
        expected = {name: (tuple(block.shape), np.float32) for name, block in parameters.items()}
    else:
        expected = _graph_blocks(Path(model_path))
    problems = [f"missing block for graph input {name!r}" for name in sorted(set(expected) - set(parameters))]
    problems += [f"{name!r} is not an overridable block of the graph" for name in sorted(set(parameters) - set(expected))]
    skip = 1 if stacks else 0  # a stack's first dim (how many adapters) is free
    for name in sorted(set(expected) & set(parameters)):
        if tuple(parameters[name].shape)[skip:] != expected[name][0][skip:]:
            problems.append(f"{name!r}: shape {tuple(parameters[name].shape)}, the graph expects {expected[name][0]}")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = stage_beside(path)
    try:
        adapter_format.export_adapter(str(staged))
        os.replace(staged, path)
    finally:
        Path(staged).unlink(missing_ok=True)
    return path
