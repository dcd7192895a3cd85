"""onnxruntime-genai folders: a MiSS causal LM as a folder that `onnxruntime_genai.Model(folder)` opens.

    export_genai_folder(model, "out", merged=False, tokenizer_from="base", adapters={"other": "other_adapter"})

    out/model.onnx (+ model.onnx.data)    export_causal_lm's KV-cache graph (merged, or blocks overridable)
    out/genai_config.json                 type "decoder", Optimum's names, heads, layers, ids, search defaults
    out/tokenizer.json, ...               copied from `tokenizer_from` when present
    out/adapters/<name>.onnx_adapter      unmerged only: the exported adapter, and any others given

    model = og.Model("out"); adapters = og.Adapters(model)
    adapters.load("out/adapters/other.onnx_adapter", "other")
    generator = og.Generator(model, params); generator.set_active_adapter(adapters, "other")

What onnxruntime-genai 0.18 needs of such a graph (its "decoder" type runs any ONNX decoder whose
names the config gives): KV layout [batch, kv_heads, seq, head_dim]; `past_present_share_buffer`
false (the graph concatenates past and new keys, so present cannot live in past's buffer); logits
for every position. It feeds an all-ones mask and positions 0..n-1, and treats prompt tokens equal to
`pad_token_id` as padding: left-padded batches do not match transformers there (session.generate
serves them). An adapter is any set of overridable initializers, so MiSS blocks swap as LoRA's do.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from miss_compile.files import write_files_atomically
from miss_compile.peft_compat import model_root, named_miss_layers

from .adapters import adapter_fit_problems, adapter_parameters, read_onnx_adapter, write_onnx_adapter
from .names import is_block_input
from .onnx import export_causal_lm
from .provenance import generation_ids, token_ids_of

__all__ = ["export_genai_folder", "GenaiFolder", "GENAI_ARCHITECTURES", "TOKENIZER_FILES"]

logger = logging.getLogger(__name__)

# transformers model_type -> what onnxruntime-genai runs our graph of it as; each is tested
# (tests/test_genai.py): a per-layer key/value cache and plain attention, as genai's "decoder" takes.
GENAI_ARCHITECTURES = {"gpt2": "decoder", "llama": "decoder", "mistral": "decoder", "qwen2": "decoder"}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")

ADAPTER_SUFFIX = ".onnx_adapter"
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

AdapterSource = str | os.PathLike | nn.Module


@dataclass
class GenaiFolder:
    path: Path
    merged: bool
    config: dict[str, Any]
    adapters: dict[str, Path] = field(default_factory=dict)  # og.Adapters name -> its .onnx_adapter
    tokenizer_files: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        decoder = self.config["model"]["decoder"]
        kind = "merged" if self.merged else f"unmerged, adapters {sorted(self.adapters)}"
        return (f"{self.path}: onnxruntime-genai folder ({kind}), {decoder['num_hidden_layers']} layers, "
                f"{decoder['num_key_value_heads']} kv heads x {decoder['head_size']}, context "
                f"{self.config['model']['context_length']}, tokenizer files {self.tokenizer_files or 'none'}")


def export_genai_folder(
    model: nn.Module,
    out_dir: str | os.PathLike,
    merged: bool = True,
    adapters: Mapping[str, AdapterSource] | None = None,
    tokenizer_from: str | os.PathLike | None = None,
    context_length: int | None = None,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    check: bool = True,
) -> GenaiFolder:
    """Write `out_dir` (new or empty) as an onnxruntime-genai folder of `model`, a decoder-only causal
    LM with MiSS adapters (PEFT's or ours), all at once: a failure leaves no folder.

    merged=False keeps the blocks apart and writes `adapters/<name>.onnx_adapter` for the model's active
    adapter and for each of `adapters` (name -> a PEFT MiSS folder, a model whose active adapter it is,
    or an `.onnx_adapter` file for this graph); every one is checked against the graph before export.
    tokenizer_from: a folder whose tokenizer files are copied (default: the model's local
    `name_or_path`, if it is a folder). device: the provider written in the config ("cpu", "cuda").
    check: open the written folder with onnxruntime-genai and run one step per adapter.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    lm = model_root(model)
    model_type = _check_architecture(lm)
    _token_ids(lm)  # refused before the export when the model names no eos
    if device not in ("cpu", "cuda"):
        raise ValueError(f"export_genai_folder: device must be 'cpu' or 'cuda', got {device!r}")
    if merged and adapters:
        raise ValueError(f"export_genai_folder: adapters {sorted(adapters)} given with merged=True; a merged graph has "
                         "no blocks to swap: pass merged=False to serve several adapters")
    graph_adapter = None if merged else _graph_adapter(model)
    sources = {} if merged else {graph_adapter: model, **dict(adapters or {})}
    if not merged and adapters and graph_adapter in adapters:
        raise ValueError(f"export_genai_folder: adapters names {graph_adapter!r}, the exported adapter's own name "
                         "(written from the model); give the other adapter another name")
    expected = {} if merged else _block_shapes(adapter_parameters(model, graph_adapter))
    for name, source in sources.items():
        _check_source(name, source, graph_adapter, expected, model_type)
    tokenizer_folder = _tokenizer_folder(lm, tokenizer_from)
    written: dict[str, Any] = {}

    def write(staged: Path) -> None:
        staged.mkdir()
        written.update(_write_folder(model, staged, merged, graph_adapter, sources, expected, tokenizer_folder,
                                     context_length, dtype, device, model_type))
        if check:
            _check_folder(staged, written["config"], written["adapters"], model, graph_adapter, dtype)

    write_files_atomically(out_dir, write)
    folder = GenaiFolder(path=out_dir, merged=merged, config=written["config"],
                         adapters={name: out_dir / "adapters" / f"{name}{ADAPTER_SUFFIX}" for name in written["adapters"]},
                         tokenizer_files=written["tokenizer_files"])
    logger.info("%s", folder)
    return folder


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"export_genai_folder: {out_dir} is a file; pass a folder path")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise FileExistsError(f"export_genai_folder: {out_dir} exists and is not empty; a genai folder is written "
                              "whole: remove it or choose a new folder")
    parent = out_dir.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise PermissionError(f"export_genai_folder: cannot write {out_dir}: {parent} is not a writable folder")


def _check_architecture(lm: nn.Module) -> str:
    """The model's transformers model_type, when genai can run our graph of it; a ValueError otherwise."""
    config = getattr(lm, "config", None)
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(sorted(GENAI_ARCHITECTURES))
    name = type(lm).__name__
    if config is None or model_type is None:
        raise ValueError(f"export_genai_folder: {name} is not a transformers model (no config.model_type); "
                         f"onnxruntime-genai folders are written for transformers causal LMs: {supported}")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"export_genai_folder: {name} ({model_type}) is an encoder-decoder model; "
                         f"text-generation-with-past exports decoder-only causal LMs ({supported})")
    if not _is_causal_lm(lm):
        raise ValueError(f"export_genai_folder: {name} ({model_type}) is not a causal LM and keeps no KV cache "
                         f"(an encoder?); text-generation-with-past needs a decoder-only causal LM with a language "
                         f"modeling head, such as {supported}")
    if model_type not in GENAI_ARCHITECTURES:
        raise ValueError(f"export_genai_folder: {name} (model_type {model_type!r}) is not an architecture this "
                         f"exporter writes onnxruntime-genai folders for; supported: {supported}")
    return model_type


def _is_causal_lm(lm: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(lm).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _graph_adapter(model: nn.Module) -> str:
    """The one adapter an unmerged graph is exported with (its blocks are named after it)."""
    active = {adapter for layer in named_miss_layers(model).values() if not layer.disable_adapters
              for adapter in layer.active_adapters if adapter in layer.miss_block}
    if len(active) != 1:
        found = sorted(active) or "none"
        raise ValueError(f"export_genai_folder(merged=False): the model has active adapters {found}; an unmerged "
                         "genai folder serves one adapter at a time (others as adapter files): activate one "
                         "(set_adapter), or pass merged=True")
    return active.pop()


def _block_shapes(parameters: Mapping[str, Any]) -> dict[str, tuple[tuple, None]]:
    return {name: (tuple(value.shape), None) for name, value in parameters.items()}


def _source_blocks(source: AdapterSource, graph_adapter: str) -> dict[str, Any]:
    if isinstance(source, nn.Module):
        return adapter_parameters(source, _graph_adapter(source), as_name=graph_adapter)
    path = Path(source)
    if path.suffix == ADAPTER_SUFFIX:
        return read_onnx_adapter(path)
    return adapter_parameters(path, as_name=graph_adapter)


def _check_source(name: str, source: AdapterSource, graph_adapter: str, expected: dict, model_type: str) -> None:
    if not _FILE_NAME.fullmatch(name):
        raise ValueError(f"export_genai_folder: adapter name {name!r} must be a plain file name (letters, digits, "
                         "'_', '.', '-'); it names adapters/<name>.onnx_adapter")
    if not isinstance(source, nn.Module) and not Path(source).exists():
        raise FileNotFoundError(f"export_genai_folder: adapter {name!r}: {source} does not exist")
    problems = adapter_fit_problems(_block_shapes(_source_blocks(source, graph_adapter)), expected)
    problems.sort(key=lambda problem: problem.startswith("missing"))  # wrong shapes and names tell more
    if problems:
        shown = problems[:6] + ([f"... and {len(problems) - 6} more"] if len(problems) > 6 else [])
        raise ValueError(f"export_genai_folder: adapter {name!r} ({source if not isinstance(source, nn.Module) else 'a model'}) "
                         f"does not fit the {model_type} graph exported with adapter {graph_adapter!r}, so it is "
                         "for another graph:\n  " + "\n  ".join(shown))


def _tokenizer_folder(lm: nn.Module, tokenizer_from: str | os.PathLike | None) -> Path | None:
    if tokenizer_from is not None:
        folder = Path(tokenizer_from)
        if not folder.is_dir():
            raise NotADirectoryError(f"export_genai_folder: tokenizer_from={folder} is not a folder")
        return folder
    name = getattr(getattr(lm, "config", None), "name_or_path", "") or ""
    return Path(name) if name and Path(name).is_dir() else None


def _write_folder(model: nn.Module, staged: Path, merged: bool, graph_adapter: str | None,
                  sources: dict[str, AdapterSource], expected: dict, tokenizer_folder: Path | None,
                  context_length: int | None, dtype: torch.dtype | None, device: str, model_type: str) -> dict[str, Any]:
    graph_path = staged / "model.onnx"
    export_causal_lm(model, graph_path, merged=merged, dtype=dtype)
    graph = onnx.load(str(graph_path), load_external_data=False).graph
    blocks = {i.name for i in graph.input if is_block_input(i.name)}
    if blocks != set(expected):
        raise RuntimeError(f"export_genai_folder: the exported graph's blocks {sorted(blocks)[:4]}... differ from the "
                           f"model's {sorted(expected)[:4]}...; report this as a bug of export_causal_lm")
    lm = model_root(model)
    config = genai_config(lm, graph, GENAI_ARCHITECTURES[model_type], context_length, device)
    (staged / "genai_config.json").write_text(json.dumps(config, indent=4) + "\n")
    for name, source in sources.items():
        target = staged / "adapters" / f"{name}{ADAPTER_SUFFIX}"
        target.parent.mkdir(exist_ok=True)
        if isinstance(source, nn.Module):
            write_onnx_adapter(source, target, graph_path, adapter_name=_graph_adapter(source), as_name=graph_adapter)
        elif Path(source).suffix == ADAPTER_SUFFIX:
            shutil.copyfile(source, target)
        else:
            write_onnx_adapter(source, target, graph_path, as_name=graph_adapter)
    copied = []
    for file_name in TOKENIZER_FILES if tokenizer_folder is not None else ():
        if (tokenizer_folder / file_name).is_file():
            shutil.copyfile(tokenizer_folder / file_name, staged / file_name)
            copied.append(file_name)
    return {"config": config, "adapters": list(sources), "tokenizer_files": copied}


def _token_ids(lm: nn.Module) -> dict[str, Any]:
    """bos / eos / pad ids as generate would use them (export.provenance.generation_ids); pad falls
    back to the first eos (what genai's model builder does). A model without an eos id is refused:
    genai would stop at token 0 (its eos defaults to the pad id)."""
    found = generation_ids(lm)
    eos, pad, bos = found["eos_token_id"], found["pad_token_id"], found["bos_token_id"]
    from_config = token_ids_of(lm.config)["eos_token_id"]
    if eos is None and from_config is not None:
        eos = from_config
        logger.warning("export_genai_folder: %s's generation_config names no eos_token_id; config.json's %s is "
                       "written, since onnxruntime-genai needs one to stop (transformers' generate would not stop "
                       "there)", type(lm).__name__, eos)
    if eos is None:
        raise ValueError(f"export_genai_folder: {type(lm).__name__} names no eos_token_id (config.json or "
                         "generation_config.json); onnxruntime-genai needs one to stop: set "
                         "model.config.eos_token_id (or model.generation_config.eos_token_id) before export")
    ids = {"eos_token_id": eos, "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)}
    if bos is not None:
        ids["bos_token_id"] = bos
    return ids


def _static_dims(value_info: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def _name_pattern(name_of: Any, kind: str, layers: int) -> str:
    """genai's printf pattern ('past_key_values.%d.key') of a cache name, checked for every layer."""
    pattern = name_of(0, kind).replace(".0.", ".%d.", 1)
    wrong = [layer for layer in range(layers) if pattern % layer != name_of(layer, kind)]
    if "%d" not in pattern or wrong:
        raise ValueError(f"export_genai_folder: cache names such as {name_of(0, kind)!r} have no '.N.' layer part "
                         "that onnxruntime-genai's %d pattern can express")
    return pattern


def genai_config(lm: nn.Module, graph: onnx.GraphProto, model_type: str = "decoder", context_length: int | None = None,
                 device: str = "cpu") -> dict[str, Any]:
    """The genai_config.json of `graph` (export_causal_lm's graph of `lm`, a transformers causal LM):
    names, layers, kv heads and head size read from the graph; ids and search defaults from the model."""
    from .causal_lm import past_name, present_name

    inputs = {i.name: i for i in graph.input}
    outputs = {o.name for o in graph.output}
    layers = 0
    while past_name(layers, "key") in inputs:
        layers += 1
    missing = sorted({"input_ids", "attention_mask", "logits", past_name(0, "key"), present_name(0, "key")}
                     - set(inputs) - outputs)
    if missing:
        raise ValueError(f"export_genai_folder: the graph lacks {missing}; onnxruntime-genai needs a KV-cache graph "
                         "(export_causal_lm)")
    _, kv_heads, _, head_size = _static_dims(inputs[past_name(0, "key")])
    config = lm.config
    if kv_heads is None or head_size is None:
        raise ValueError(f"export_genai_folder: {past_name(0, 'key')} has dims {_static_dims(inputs[past_name(0, 'key')])}; "
                         "kv heads and head size must be static for onnxruntime-genai")
    context_length = context_length or getattr(config, "max_position_embeddings", None)
    if not context_length or context_length < 1:
        raise ValueError(f"export_genai_folder: {type(lm).__name__} has no max_position_embeddings; pass context_length")
    generation = getattr(lm, "generation_config", None)

    def search(name: str, default: Any) -> Any:
        value = getattr(generation, name, None) if generation is not None else None
        return default if value is None else value

    decoder_inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if "position_ids" in inputs:
        decoder_inputs["position_ids"] = "position_ids"
    decoder_inputs["past_key_names"] = _name_pattern(past_name, "key", layers)
    decoder_inputs["past_value_names"] = _name_pattern(past_name, "value", layers)
    return {
        "model": {
            **_token_ids(lm),
            "context_length": int(context_length),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai",
                                    "provider_options": [] if device == "cpu" else [{"cuda": {}}]},
                "filename": "model.onnx",
                "head_size": int(head_size),
                "hidden_size": int(config.hidden_size),
                "inputs": decoder_inputs,
                "outputs": {"logits": "logits", "present_key_names": _name_pattern(present_name, "key", layers),
                            "present_value_names": _name_pattern(present_name, "value", layers)},
                "num_attention_heads": int(config.num_attention_heads),
                "num_hidden_layers": layers,
                "num_key_value_heads": int(kv_heads),
            },
            "type": model_type,
            "vocab_size": int(config.vocab_size),
        },
        "search": {
            "do_sample": bool(search("do_sample", False)),
            "max_length": int(context_length),
            "min_length": 0,
            "num_beams": int(search("num_beams", 1)),
            "num_return_sequences": 1,
            # present = concat(past, new): a new buffer each step, never past's own (genai's share-buffer
            # mode needs attention that writes into a max-length past in place)
            "past_present_share_buffer": False,
            "repetition_penalty": float(search("repetition_penalty", 1.0)),
            "temperature": float(search("temperature", 1.0)),
            "top_k": int(search("top_k", 50)),
            "top_p": float(search("top_p", 1.0)),
        },
    }


def _check_folder(folder: Path, config: dict[str, Any], adapters: list[str], model: nn.Module,
                  graph_adapter: str | None, dtype: torch.dtype | None) -> None:
    """Open the staged folder as a server would and run one prefill without an adapter and one per adapter
    file: logits for every prompt position, finite, and (the exported adapter's, or the merged graph's)
    equal to the model's in torch. Skipped, with a warning, where onnxruntime-genai is not installed."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        warnings.warn("onnxruntime-genai is not installed: the folder was written but not opened to check it "
                      "(pip install onnxruntime-genai, or onnxruntime-genai-cuda beside onnxruntime-gpu)",
                      RuntimeWarning, stacklevel=3)
        return
    specials = {config["model"]["pad_token_id"], config["model"].get("bos_token_id")}
    eos = config["model"]["eos_token_id"]
    specials |= set(eos) if isinstance(eos, list) else {eos}
    vocab = config["model"]["vocab_size"]
    prompt = [token for token in range(vocab) if token not in specials][:4]  # pad ids would read as padding
    device, training = next(model.parameters()).device, model.training
    with torch.no_grad():
        model.eval()  # what the export saw (its copy is in eval mode): no dropout
        try:
            expected = model(input_ids=torch.tensor([prompt], device=device), use_cache=False).logits
        finally:
            model.train(training)
    expected = expected.float().cpu().numpy()
    precision = dtype or next(model.parameters()).dtype
    tolerance = (1e-4 if precision == torch.float32 else 5e-2) * max(1.0, float(np.abs(expected).max()))
    genai_model = og.Model(str(folder))
    loaded = og.Adapters(genai_model) if adapters else None
    for name in adapters:
        loaded.load(str(folder / "adapters" / f"{name}{ADAPTER_SUFFIX}"), name)
    for name in [None, *adapters]:
        params = og.GeneratorParams(genai_model)
        params.set_search_options(max_length=len(prompt) + 1, do_sample=False)
        generator = og.Generator(genai_model, params)
        if name is not None:
            generator.set_active_adapter(loaded, name)
        generator.append_tokens(prompt)
        logits = generator.get_output("logits")
        if logits.shape != expected.shape or not np.isfinite(logits).all():
            raise RuntimeError(f"export_genai_folder: onnxruntime-genai ran the folder with adapter {name!r} and got "
                               f"logits of shape {logits.shape} (expected {expected.shape}, all finite)")
        error = float(np.abs(logits.astype(np.float32) - expected).max())
        if name in (None, graph_adapter) and error > tolerance:
            raise RuntimeError(f"export_genai_folder: onnxruntime-genai's logits with adapter {name!r} differ from "
                               f"torch's by {error:.3e} (tolerance {tolerance:.1e}); the genai_config.json does not "
                               "describe the graph: report this as a bug")
        del generator
