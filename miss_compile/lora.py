"""MiSS balance / mini adapters as exact PEFT LoRA checkpoints, for LoRA serving engines.

The chunk sum is a fixed 0/1 projection: `S(x) = x @ A.T` with `A[k, i] = 1 if i % r == k`
(`[r, in]`, the balance update of the identity block `I_r`; zero padding adds nothing), so
`S(x) @ D == lora_B(lora_A(x))` with `lora_A = A`, `lora_B = expand_block(D).T` (`[out, r]`) and
scaling 1 (`lora_alpha = r`, no rsLoRA). Dropout acts on x before A in both. Bat is no LoRA: its
update depends on W. Several adapters sum into one LoRA of rank r1 + r2 (A's rows and B's columns
concatenated), exact because balance / mini updates add.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import reference
from .adapter_settings import check_consistent
from .checkpoint import CONFIG_NAME, KEY_PREFIX, modules_to_save_of, read_checkpoint, write_peft_folder
from .layer import base_features
from .peft_compat import is_miss_layer, layers_with, model_root, named_miss_layers, peft_tuner, shared_weights
from .saved_modules import saved_tensors

logger = logging.getLogger(__name__)

__all__ = ["to_lora", "lora_factors"]


@dataclass
class _LayerBlock:
    """One adapter's block on one layer, with what the conversion needs to know of the layer."""

    block: torch.Tensor
    variant: str
    in_features: int
    out_features: int
    conv1d: bool


@dataclass
class _Adapter:
    """One named adapter as read from a model or a folder."""

    name: str
    dropout: float
    layers: dict[str, _LayerBlock]
    modules_to_save: list[str] | None = None
    saved: dict[str, torch.Tensor] = field(default_factory=dict)
    task_type: str | None = None
    base_model_name_or_path: str | None = None


def lora_factors(
    block: torch.Tensor, variant: str, in_features: int, out_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A `[r, in]`, lora_B `[out, r]`) with `lora_B @ lora_A` the update of a balance / mini
    block, in the block's dtype; bat raises (its update depends on the base weight)."""
    if variant == "bat":
        raise ValueError("variant 'bat' is no LoRA: its update W_pq @ D_p + D_p depends on the base weight")
    d = reference.expand_block(block.detach(), variant, out_features)  # [r, out]
    r = d.shape[0]
    # A is the balance update of the identity block on an r-output layer: dW[k, i] = I[i % r, k].
    lora_a = reference.delta_weight(d.new_empty(r, in_features), torch.eye(r, dtype=d.dtype, device=d.device), "balance")
    return lora_a.to(block.dtype).contiguous(), d.t().contiguous()


def to_lora(
    source: nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    adapter_name: str = "default",
    *,
    combine: list[str] | None = None,
    base_model: nn.Module | str | os.PathLike | None = None,
    uniform_rank: bool = False,
) -> Path:
    """Write a MiSS adapter as a standard PEFT LoRA checkpoint that gives the same outputs.

    source: a model with MiSS adapters (ours or a live PEFT model), or a PEFT-format MiSS folder
    (adapter `name` other than "default" is read from its `name/` subfolder when there is one, as
    PEFT's save_pretrained lays them out). A folder needs `base_model` (a model, or a local
    transformers folder: only its config.json is read) for each layer's in_features and type.
    combine: names of adapters to sum into one LoRA (rank r1 + r2 per layer, `rank_pattern` where
    layers differ); `adapter_name` is then unused. uniform_rank: pad every layer to the largest
    rank with zeros instead (exact too; for engines that ignore rank_pattern). Anything that cannot
    convert exactly (bat, several modules_to_save heads, different dropouts) is refused naming the
    layer and the reason, and nothing is written. Returns `out_dir`.
    """
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name must be one name, got {adapter_name!r}; to sum adapters pass combine=[names]")
    names = list(combine) if combine is not None else [adapter_name]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"combine must name distinct adapters, got {combine!r}")
    if isinstance(source, nn.Module):
        root = model_root(source)
        adapters = [_read_model(source, name) for name in names]
    else:
        root = _base_root(base_model, Path(source))
        adapters = [_read_folder(Path(source), name, root) for name in names]
    tensors, config = _convert(adapters, uniform_rank)
    _warn_if_tied(root, sorted({name for adapter in adapters for name in adapter.layers}))
    return write_peft_folder(out_dir, tensors, config)


def _warn_if_tied(root: nn.Module, layer_names: list[str]) -> None:
    """One WARNING for targets whose weight another module shares (a tied lm_head): the LoRA is exact as
    an adapter, but PEFT's merge_and_unload writes W + dW into the shared weight, the embeddings too."""
    modules = {name: root.get_submodule(name) for name in layer_names}
    weights = {name: (_base_of(module) if is_miss_layer(module) else module).weight for name, module in modules.items()}
    tied = shared_weights(root, weights)
    if tied:
        others = sorted({reader for name, readers in tied.items() for reader in readers
                         if not reader.startswith(name + ".")})
        logger.warning(
            "to_lora: %s share their weight with %s (tied embeddings). The LoRA gives the MiSS outputs as an "
            "adapter, but PEFT's merge_and_unload() writes W + dW into the shared weight and so changes the "
            "embeddings too: serve it unmerged (vLLM, SGLang and PEFT do), or untie the weights before merging.",
            sorted(tied), others)


# --- reading


def _base_of(layer: nn.Module) -> nn.Module:
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer.base_layer


def _read_model(model: nn.Module, name: str) -> _Adapter:
    layers = layers_with(model, name)
    if not layers:
        present = sorted({a for layer in named_miss_layers(model).values() for a in layer.miss_block})
        raise ValueError(f"no layer carries an adapter named {name!r}; the model's adapters: {present}")
    settings = check_consistent(layers, name)
    blocks = {}
    for layer_name, layer in layers.items():
        base = _base_of(layer)
        in_features, out_features = base_features(base)
        blocks[layer_name] = _LayerBlock(layer.miss_block[name].detach(), settings.variant, in_features, out_features,
                                         isinstance(base, Conv1D))
    tuner = peft_tuner(model)
    peft_config = tuner.peft_config[name] if tuner is not None else None
    task_type = getattr(peft_config, "task_type", None)
    return _Adapter(
        name=name, dropout=settings.dropout, layers=blocks,
        modules_to_save=modules_to_save_of(model, name), saved=saved_tensors(model_root(model), name),
        task_type=None if task_type is None else str(getattr(task_type, "value", task_type)),
        base_model_name_or_path=getattr(peft_config, "base_model_name_or_path", None),
    )


def _adapter_folder(folder: Path, name: str) -> Path:
    """Where adapter `name` lives in PEFT's layout: `default` in the folder, others in `<name>/`. A folder
    holding one adapter serves any name (save_adapter writes a named adapter at the top); one with
    several refuses a name it does not hold rather than convert another adapter."""
    nested = folder / name
    if name != "default" and (nested / CONFIG_NAME).is_file():
        return nested
    others = sorted(child.name for child in folder.iterdir() if (child / CONFIG_NAME).is_file())
    if name != "default" and others:
        raise ValueError(f"{folder} holds no adapter named {name!r}: it holds 'default' (the top folder) and "
                         f"{others} (subfolders); pass one of them as adapter_name (--adapter-name)")
    return folder


def _read_folder(folder: Path, name: str, base: nn.Module) -> _Adapter:
    folder = _adapter_folder(folder, name)
    checkpoint = read_checkpoint(folder)
    config, fields = checkpoint.config, checkpoint.fields
    problems, blocks = [], {}
    for layer_name, block in sorted(checkpoint.blocks.items()):
        try:
            module = base.get_submodule(layer_name)
        except AttributeError:
            problems.append(f"{layer_name}: no such module in the base model {type(base).__name__}")
            continue
        if is_miss_layer(module):
            module = _base_of(module)
        features = base_features(module)
        if features is None:
            problems.append(f"{layer_name}: a {type(module).__name__} in the base model, not a Linear or Conv1D")
            continue
        in_features, out_features = features
        expected = config.block_shape(in_features, out_features)
        if tuple(block.shape) != expected:
            problems.append(f"{layer_name}: block {tuple(block.shape)} in {folder}, but the base layer "
                            f"(in_features={in_features}, out_features={out_features}) needs {expected}")
            continue
        try:
            config.check_layer(layer_name, in_features, out_features)
        except ValueError as error:
            problems.append(str(error))
            continue
        blocks[layer_name] = _LayerBlock(block, config.variant, in_features, out_features, isinstance(module, Conv1D))
    if problems:
        raise ValueError(f"cannot convert {folder} against the base model:\n  " + "\n  ".join(problems))
    return _Adapter(
        name=name, dropout=float(config.dropout), layers=blocks,
        modules_to_save=config.modules_to_save, saved=checkpoint.saved,
        task_type=fields.get("task_type"), base_model_name_or_path=fields.get("base_model_name_or_path"),
    )


def _base_root(base_model: nn.Module | str | os.PathLike | None, folder: Path) -> nn.Module:
    """The module whose named_modules() the checkpoint's layer names refer to."""
    if isinstance(base_model, nn.Module):
        return model_root(base_model)
    if base_model is None:
        fields = json.loads((folder / CONFIG_NAME).read_text()) if (folder / CONFIG_NAME).is_file() else {}
        named = fields.get("base_model_name_or_path")
        if not named or not (Path(named) / "config.json").is_file():
            raise ValueError(
                f"converting the folder {folder} needs the base model for each layer's in_features and type "
                f"(its base_model_name_or_path {named!r} is no local model folder): pass base_model= "
                "(a model or a local transformers folder; only its config.json is read)"
            )
        base_model = named
    return _meta_model(Path(base_model))


def _meta_model(folder: Path) -> nn.Module:
    """The model of a local transformers folder, built on the meta device from config.json alone."""
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a transformers model folder (no config.json)")
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    with torch.device("meta"):
        if model_class is None:
            return transformers.AutoModel.from_config(config)
        return model_class(config)


# --- converting


def _refusals(adapters: list[_Adapter]) -> list[str]:
    problems = []
    for adapter in adapters:
        for layer_name, layer in adapter.layers.items():
            if layer.variant == "bat":
                problems.append(
                    f"{layer_name}: adapter {adapter.name!r} is bat, whose update W_pq @ D_p + D_p depends on the base "
                    "weight W: no LoRA of rank r gives it. Merge it instead (merge_adapters, or miss-export's merged "
                    "ONNX) and serve the merged model"
                )
            elif not torch.isfinite(layer.block).all():
                problems.append(f"{layer_name}: adapter {adapter.name!r} block holds NaN or Inf; the checkpoint is damaged")
    dropouts = {adapter.name: adapter.dropout for adapter in adapters}
    if len(set(dropouts.values())) > 1:
        problems.append(f"adapters {dropouts} have different dropouts; a LoRA has one lora_dropout: combine adapters "
                        "trained with the same dropout")
    heads = [adapter.name for adapter in adapters if adapter.saved]
    if len(heads) > 1:
        problems.append(f"adapters {heads} each train their own modules_to_save copies; one LoRA carries one: combine "
                        "at most one of them")
    return problems


def _convert(adapters: list[_Adapter], uniform_rank: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The LoRA tensors (PEFT's keys) and adapter_config.json fields; raises listing every refusal."""
    problems = _refusals(adapters)
    if problems:
        names = [adapter.name for adapter in adapters]
        raise ValueError(f"cannot convert adapter(s) {names} to LoRA exactly; nothing written:\n  " + "\n  ".join(problems))
    factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    conv1d = False
    for adapter in adapters:
        for layer_name, layer in adapter.layers.items():
            lora_a, lora_b = lora_factors(layer.block, layer.variant, layer.in_features, layer.out_features)
            factors.setdefault(layer_name, []).append((lora_a, lora_b))
            conv1d = conv1d or layer.conv1d
    max_rank = max(sum(a.shape[0] for a, _ in pairs) for pairs in factors.values())
    tensors, ranks = {}, {}
    for layer_name, pairs in sorted(factors.items()):
        dtype = functools.reduce(torch.promote_types, (b.dtype for _, b in pairs))
        lora_a = torch.cat([a.to(dtype) for a, _ in pairs], dim=0)  # [r1 + r2, in]
        lora_b = torch.cat([b.to(dtype) for _, b in pairs], dim=1)  # [out, r1 + r2]
        if uniform_rank:  # zero rows of A meet zero columns of B: the same update at the largest rank
            pad = max_rank - lora_a.shape[0]
            lora_a = torch.cat([lora_a, lora_a.new_zeros(pad, lora_a.shape[1])], dim=0)
            lora_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], pad)], dim=1)
        tensors[f"{KEY_PREFIX}{layer_name}.lora_A.weight"] = lora_a
        tensors[f"{KEY_PREFIX}{layer_name}.lora_B.weight"] = lora_b
        ranks[layer_name] = lora_a.shape[0]
    for adapter in adapters:
        tensors.update({KEY_PREFIX + key: value for key, value in adapter.saved.items()})
    return tensors, _lora_config(adapters, ranks, conv1d)


def _lora_config(adapters: list[_Adapter], ranks: dict[str, int], conv1d: bool) -> dict[str, Any]:
    counts = Counter(ranks.values())
    r = max(counts, key=lambda rank: (counts[rank], rank))  # the commonest rank; the others by pattern
    pattern = {name: rank for name, rank in ranks.items() if rank != r}
    head = next((adapter for adapter in adapters if adapter.saved), None)
    first = adapters[0]
    return {
        "peft_type": "LORA",
        "task_type": next((a.task_type for a in adapters if a.task_type), None),
        "base_model_name_or_path": first.base_model_name_or_path,
        "r": r,
        "lora_alpha": r,  # scaling = lora_alpha / r = 1
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": first.dropout,
        "target_modules": sorted(ranks),
        "exclude_modules": None,
        "fan_in_fan_out": conv1d,  # GPT-2 Conv1D; lora_A / lora_B keep the Linear layout either way
        "bias": "none",
        "lora_bias": False,
        "init_lora_weights": True,
        "modules_to_save": None if head is None else list(head.modules_to_save or []) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }
