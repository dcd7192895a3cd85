"""What a MiSS file holds, in words: `describe(path)` for an adapter folder (ours or PEFT's), an
`.onnx` graph or an `.onnx_adapter` (what `miss-export inspect PATH` prints).

Layers are grouped by name with their indices folded (`model.layers.*.self_attn.q_proj x32`), so a
7B model's 224 adapted Linears read as a handful of lines. Graphs and adapter files do not record
out_features, so a 2-D block there is "balance or mini"; an adapter folder's config names its variant.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

from miss_compile.checkpoint import read_checkpoint

from .adapters import read_onnx_adapter
from .names import STACK_SUFFIX, is_block_input, is_stack_input, split_block_input

__all__ = ["describe"]


def describe(path: str | os.PathLike) -> str:
    """A few lines on what `path` holds: variant, ranks, layers, dtypes, sizes; for graphs merged
    or unmerged, which blocks are overridable, and metadata_props."""
    path = Path(path)
    if path.is_dir():
        return _describe_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; inspect takes an adapter folder, an .onnx or an .onnx_adapter")
    if path.suffix == ".onnx_adapter":
        return _describe_adapter_file(path)
    if path.suffix == ".onnx":
        return _describe_graph(path)
    raise ValueError(f"{path}: inspect takes an adapter folder (adapter_config.json), an .onnx or an "
                     f".onnx_adapter, not a {path.suffix or 'suffix-less'} file")


def _describe_folder(folder: Path) -> str:
    if not (folder / "adapter_config.json").is_file():
        what = "a transformers model folder (config.json)" if (folder / "config.json").is_file() else "not an adapter folder"
        raise ValueError(f"{folder} is {what}: inspect takes an adapter folder (adapter_config.json), "
                         "an .onnx or an .onnx_adapter")
    checkpoint = read_checkpoint(folder)
    config = checkpoint.config
    fields = json.loads((folder / "adapter_config.json").read_text())
    weights = sum(f.stat().st_size for f in folder.glob("adapter_model.*") if f.is_file())
    shapes = {name: tuple(block.shape) for name, block in checkpoint.blocks.items()}
    dtypes = sorted({str(block.dtype).removeprefix("torch.") for block in checkpoint.blocks.values()})
    mini = f", mini_r {config.mini_r}" if config.variant == "mini" else ""
    lines = [
        f"adapter folder {folder}: PEFT-format MiSS checkpoint",
        f"  variant {config.variant}, r {config.r}{mini}, {len(shapes)} layers, blocks {'/'.join(dtypes) or '-'}, "
        f"ranks {_ranks(shapes)}, weights {_size(weights)}",
        f"  base model: {fields.get('base_model_name_or_path') or 'not recorded'}"
        + "".join(f", {key} {value}" for key, value in fields.items() if key.endswith("class") and value),
        f"  target_modules: {config.target_modules}; modules_to_save: {config.modules_to_save or 'none'}"
        + (f" ({len(checkpoint.saved)} tensors)" if checkpoint.saved else ""),
        "  layers (block shape):",
        *_layer_lines(shapes),
    ]
    return "\n".join(lines)


def _describe_adapter_file(path: Path) -> str:
    arrays = read_onnx_adapter(path)
    blocks = {name: array for name, array in arrays.items() if is_block_input(name)}
    stacks = {name: array for name, array in arrays.items() if is_stack_input(name)}
    lines = [f".onnx_adapter {path}: {len(arrays)} parameters, {_size(path.stat().st_size)}"]
    if blocks:
        names = sorted({split_block_input(name)[1] for name in blocks})
        shapes = {split_block_input(name)[0]: array.shape for name, array in blocks.items()}
        lines += [f"  blocks of adapter name {', '.join(map(repr, names))} (fits graphs exported with that name; "
                  "write_onnx_adapter(..., as_name=NAME) renames): "
                  f"{_variants(shapes)}, ranks {_ranks(shapes)}, {len(blocks)} layers, {_dtypes(blocks)}"]
    if stacks:
        sizes = sorted({array.shape[0] for array in stacks.values()})
        lines += [f"  adapter stacks (graphs exported with adapter_ids): {len(stacks)} layers, "
                  f"{'/'.join(map(str, sizes))} rows each (adapters + the zero block), {_dtypes(stacks)}"]
    others = sorted(set(arrays) - set(blocks) - set(stacks))
    if others:
        lines.append(f"  not MiSS blocks: {others[:3]}{' ...' if len(others) > 3 else ''}")
    lines.append("  layers (shape):")
    lines += _layer_lines({_layer(name): array.shape for name, array in arrays.items()})
    return "\n".join(lines)


def _describe_graph(path: Path) -> str:
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    overridable = {i.name: initializers[i.name] for i in graph.input if i.name in initializers}
    user_inputs = [i for i in graph.input if i.name not in initializers]
    blocks = {name: tensor for name, tensor in overridable.items() if is_block_input(name)}
    stacks = {name: tensor for name, tensor in overridable.items() if is_stack_input(name)}
    data_files = sorted(path.parent.glob(path.name + ".data"))
    size = path.stat().st_size + sum(f.stat().st_size for f in data_files)
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
    metadata = {p.key: p.value for p in model.metadata_props}
    recorded = _recorded_variants(metadata)
    lines = [f"ONNX graph {path}: {_graph_kind(blocks, stacks, metadata)}",
             f"  {len(graph.node)} nodes, {len(model.functions)} local functions, {_size(size)}"
             + (f" (external data {', '.join(f.name for f in data_files)})" if data_files else "")
             + f", opsets {opsets}, IR {model.ir_version}, producer {model.producer_name or '-'}",
             "  inputs: " + ", ".join(_value_text(i) for i in user_inputs),
             "  outputs: " + ", ".join(_value_text(o) for o in graph.output)]
    if blocks:
        names = sorted({split_block_input(name)[1] for name in blocks})
        shapes = {split_block_input(name)[0]: tuple(t.dims) for name, t in blocks.items()}
        lines += [f"  overridable blocks (an .onnx_adapter or a per-run feed replaces them): adapter name "
                  f"{', '.join(map(repr, names))}, {_variants(shapes, [recorded.get(n) for n in names])}, ranks {_ranks(shapes)}, {len(blocks)} layers, "
                  f"{_tensor_dtypes(blocks)}"]
    if stacks:
        shapes = {name.removesuffix(STACK_SUFFIX): tuple(t.dims) for name, t in stacks.items()}
        rows = sorted({dims[0] for dims in shapes.values()})
        lines += [f"  overridable stacks (fed by write_onnx_stack files; first dim free): {len(stacks)} layers, "
                  f"{'/'.join(map(str, rows))} rows as exported, ranks {_ranks(shapes, stacked=True)}, "
                  f"{_tensor_dtypes(stacks)}"]
    others = sorted(set(overridable) - set(blocks) - set(stacks))
    if others:
        lines.append(f"  other overridable initializers: {others[:3]}{' ...' if len(others) > 3 else ''}")
    if blocks or stacks:
        lines.append("  layers (shape):")
        lines += _layer_lines({_layer(name): tuple(t.dims) for name, t in {**blocks, **stacks}.items()})
    if model.metadata_props:
        lines.append("  metadata_props: " + ", ".join(f"{p.key}={p.value}" for p in model.metadata_props))
    return "\n".join(lines)


def _recorded_variants(metadata: dict[str, str]) -> dict[str, str]:
    """Adapter name -> variant, as the exporter records it in metadata_props (newer exports)."""
    try:
        recorded = json.loads(metadata.get("miss_compile.adapters", "{}"))
    except json.JSONDecodeError:
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _graph_kind(blocks: dict, stacks: dict, metadata: dict[str, str]) -> str:
    if stacks:
        return "unmerged, stacked (adapter_ids picks each row's adapter)"
    if blocks:
        return "unmerged (MiSS blocks are overridable graph inputs: adapters swap per run)"
    adapters = _recorded_variants(metadata)
    if metadata.get("miss_compile.merged") == "true" and adapters:
        folded = ", ".join(f"{name!r} ({variant})" for name, variant in adapters.items())
        return (f"merged: adapter {folded} folded into the weights, no overridable blocks, so .onnx_adapter "
                "files do not apply (export with merged=False / miss-export --unmerged to swap adapters)")
    return ("merged, or no MiSS layers: no overridable blocks, so .onnx_adapter files do not apply "
            "(export with merged=False / miss-export --unmerged to swap adapters)")


def _layer(name: str) -> str:
    if is_block_input(name):
        return split_block_input(name)[0]
    return name.removesuffix(STACK_SUFFIX)


def _layer_lines(shapes: dict[str, tuple]) -> list[str]:
    """One line per layer name pattern (indices folded to `*`) and shape, with its count."""
    groups: dict[tuple[str, tuple], int] = defaultdict(int)
    for name, shape in shapes.items():
        groups[re.sub(r"(?<=\.)\d+(?=\.)", "*", name), tuple(shape)] += 1
    width = max((len(pattern) for pattern, _ in groups), default=0)
    return [f"    {pattern:<{width}}  x{count:<3} {list(shape)}" for (pattern, shape), count in sorted(groups.items())]


def _variants(shapes: dict[str, tuple], recorded: list[str | None] = ()) -> str:
    """From the metadata when recorded; else from the block shapes (a 2-D block is balance or mini)."""
    if recorded and all(recorded):
        return "variant " + " and ".join(sorted(set(recorded)))
    kinds = sorted({"bat" if len(shape) == 3 else "balance or mini" for shape in shapes.values()})
    return "variant " + " and ".join(kinds)


def _ranks(shapes: dict[str, tuple], stacked: bool = False) -> str:
    """r of each block: [r, out] / [r, mini_r] (balance, mini), [out // r, r, r] (bat); stacks lead with a row dim."""
    ranks = sorted({shape[-1] if len(shape) - stacked == 3 else shape[-2] for shape in shapes.values()})
    return "/".join(map(str, ranks)) or "-"


def _dtypes(arrays: dict[str, np.ndarray]) -> str:
    return "/".join(sorted({str(array.dtype) for array in arrays.values()}))


def _tensor_dtypes(tensors: dict[str, onnx.TensorProto]) -> str:
    return "/".join(sorted({str(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)) for t in tensors.values()}))


def _value_text(value: onnx.ValueInfoProto) -> str:
    tensor = value.type.tensor_type
    dims = [d.dim_param or str(d.dim_value) for d in tensor.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type) if tensor.elem_type else "?"
    return f"{value.name} {dtype} [{', '.join(dims)}]"


def _size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
