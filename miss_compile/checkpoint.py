"""PEFT-format MiSS checkpoints: adapter_config.json + adapter_model.safetensors.

Keys are PEFT's, adapter name dropped: `base_model.model.<module>.miss_block`, where <module> is
the layer's name under the transformers model, and `base_model.model.<module>.<param>` for the
adapter's modules_to_save copies (a classifier head: `base_model.model.score.weight`). Files are
written atomically (temp file + rename).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapter_settings import check_consistent
from .checkpoint_compat import base_model_fields, warn_if_other_base_class, warn_if_peft_cannot_load
from .config import MissConfig
from .files import write_atomically
from .inject import apply_miss
from .modules_to_save import wrap_modules_to_save
from .peft_compat import adapter_variant, layers_with, model_root, peft_tuner
from .saved_modules import SavedModule, saved_module_wrappers, saved_targets, saved_tensors
from .stacked import enable_adapter_selection

__all__ = [
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "read_checkpoint",
    "write_adapter",
    "write_peft_folder",
    "AdapterCheckpoint",
    "config_of",
    "modules_to_save_of",
    "checked_pairs",
    "writable_folder",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
KEY_SUFFIX = ".miss_block"


def _key(layer_name: str) -> str:
    return f"{KEY_PREFIX}{layer_name}{KEY_SUFFIX}"


def _layer_name(key: str) -> str | None:
    if key.startswith(KEY_PREFIX) and key.endswith(KEY_SUFFIX):
        return key[len(KEY_PREFIX) : -len(KEY_SUFFIX)]
    return None


@dataclass
class AdapterCheckpoint:
    """A PEFT-format MiSS adapter folder as read: blocks by layer name, and the modules_to_save
    tensors by `<module>.<param>` (the checkpoint key less `base_model.model.`); `fields` is
    adapter_config.json as written (task_type, base_model_name_or_path, ...)."""

    config: MissConfig
    blocks: dict[str, torch.Tensor]
    saved: dict[str, torch.Tensor] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)


def config_of(layers: dict[str, nn.Module], adapter_name: str, modules_to_save: list[str] | None = None) -> MissConfig:
    """The config that re-creates `adapter_name` on exactly these layers; refuses an adapter whose
    layers disagree (one r, mini_r, dropout and variant per checkpoint)."""
    settings = check_consistent(layers, adapter_name)
    return MissConfig(
        r=settings.r,
        variant=settings.variant,
        mini_r=settings.mini_r,
        dropout=settings.dropout,
        target_modules=sorted(layers),
        modules_to_save=modules_to_save,
    )


def modules_to_save_of(model: nn.Module, adapter_name: str) -> list[str] | None:
    """The modules_to_save entries to write for `adapter_name`: PEFT's own list on a PEFT model,
    else the names of the modules holding a copy for it."""
    tuner = peft_tuner(model)
    names = sorted(n for n, w in saved_module_wrappers(model_root(model)).items() if adapter_name in w.modules_to_save)
    if tuner is not None and names and tuner.peft_config[adapter_name].modules_to_save:
        return list(tuner.peft_config[adapter_name].modules_to_save)
    return names or None


def writable_folder(directory: Path) -> Path:
    """`directory`, created if need be; a clear error when it cannot hold the adapter's files."""
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"cannot save the adapter to {directory}: it is a file; pass a folder path")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PermissionError(
            f"cannot save the adapter to {directory}: {error.strerror or error}; choose a writable folder"
        ) from None
    if not os.access(directory, os.W_OK):
        raise PermissionError(f"cannot save the adapter to {directory}: the folder is not writable; choose another")
    return directory


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write `adapter_name` in PEFT's layout, with the base model's class (PEFT's auto_mapping); PEFT's
    `PeftModel.from_pretrained` reads it as is when every layer is an nn.Linear (else a warning says so)."""
    layers = layers_with(model, adapter_name)
    if not layers:
        raise ValueError(f"no layer carries an adapter named {adapter_name!r}; nothing to save")
    merged = [name for name, layer in layers.items() if adapter_name in layer.merged_adapters]
    if merged:
        logger.info("saving %r while merged into %d layers; blocks are saved as they are", adapter_name, len(merged))
    config = config_of(layers, adapter_name, modules_to_save_of(model, adapter_name))
    blocks = {name: layer.miss_block[adapter_name] for name, layer in layers.items()}
    written = write_adapter(directory, blocks, config, saved_tensors(model_root(model), adapter_name),
                            base_model_fields(model))
    warn_if_peft_cannot_load(layers, written)
    return written


def write_adapter(
    directory: str | os.PathLike,
    blocks: dict[str, torch.Tensor],
    config: MissConfig,
    saved: dict[str, torch.Tensor] | None = None,
    fields: dict[str, Any] | None = None,
) -> Path:
    """Write blocks (layer name -> block), modules_to_save tensors (`<module>.<param>` -> tensor)
    and their config (plus `fields`, such as auto_mapping) in PEFT's layout, each file atomically."""
    if bool(saved) != bool(config.modules_to_save):
        raise ValueError(
            f"modules_to_save={config.modules_to_save} in the config but {len(saved or {})} saved-module tensors: "
            "pass both or neither (a checkpoint without the trained head would load wrong)"
        )
    tensors = {_key(name): block for name, block in blocks.items()}
    tensors.update({KEY_PREFIX + key: value for key, value in (saved or {}).items()})
    return write_peft_folder(directory, tensors, {**config.to_peft_dict(), **(fields or {})})


def write_peft_folder(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], fields: dict[str, Any]) -> Path:
    """A PEFT adapter folder: `tensors` (PEFT's keys) as adapter_model.safetensors and `fields` as
    adapter_config.json, in `directory` (created), both files atomically; returns the folder."""
    directory = writable_folder(Path(directory))
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    write_atomically({
        directory / WEIGHTS_NAME: lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
        directory / CONFIG_NAME: lambda tmp: Path(tmp).write_text(json.dumps(fields, indent=2) + "\n"),
    })
    return directory


def read_adapter(directory: str | os.PathLike) -> tuple[MissConfig, dict[str, torch.Tensor]]:
    """The config and the blocks (layer name -> tensor) of a PEFT-format MiSS adapter folder; one
    that also holds modules_to_save tensors is refused (blocks alone would load wrong): use
    read_checkpoint for those."""
    checkpoint = read_checkpoint(directory)
    if checkpoint.saved:
        raise ValueError(
            f"{directory} also holds modules_to_save tensors {sorted(checkpoint.saved)[:4]} "
            f"(modules_to_save={checkpoint.config.modules_to_save}), which the blocks alone would drop; "
            "use miss_compile.load_adapter, or read_checkpoint for blocks and saved modules together"
        )
    return checkpoint.config, checkpoint.blocks


def read_checkpoint(directory: str | os.PathLike) -> AdapterCheckpoint:
    """The config, blocks and modules_to_save tensors of a PEFT-format MiSS adapter folder."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: not a PEFT adapter folder")
    try:
        fields = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON ({error}); re-save or re-download the adapter") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(fields).__name__}")
    try:
        config = MissConfig.from_peft(fields)
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from None
    blocks, saved = _split_keys(directory, _read_tensors(directory), config)
    return AdapterCheckpoint(config, blocks, saved, fields)


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    weights_path = directory / WEIGHTS_NAME
    if weights_path.is_file():
        try:
            state = load_file(weights_path)
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise ValueError(
                f"{weights_path} is truncated or corrupted ({error}); re-save or re-download the adapter"
            ) from None
    elif (directory / LEGACY_WEIGHTS_NAME).is_file():
        state = _read_legacy(directory / LEGACY_WEIGHTS_NAME)
    else:
        raise FileNotFoundError(f"{weights_path} not found (nor {LEGACY_WEIGHTS_NAME}): the adapter has no weights")
    return state


def _split_keys(
    directory: Path, state: dict[str, torch.Tensor], config: MissConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(blocks by layer name, modules_to_save tensors by `<module>.<param>`); any other key is refused."""
    blocks, saved, unexpected = {}, {}, []
    for key, tensor in state.items():
        name = _layer_name(key)
        if name is not None:
            blocks[name] = tensor
        elif config.modules_to_save and key.startswith(KEY_PREFIX):
            saved[key[len(KEY_PREFIX) :]] = tensor
        else:
            unexpected.append(key)
    if unexpected:
        raise ValueError(
            f"{directory}: keys that are not MiSS blocks ({KEY_PREFIX}<module>{KEY_SUFFIX}) nor tensors of "
            f"modules_to_save={config.modules_to_save}: {sorted(unexpected)}" + _base_layer_hint(unexpected)
        )
    return blocks, saved


def _base_layer_hint(keys: list[str]) -> str:
    """PEFT saves the base weights of targeted embeddings / lm_head (save_embedding_layers="auto"):
    refused rather than dropped, since they may differ from the base model's (a resized vocabulary)."""
    if not any(key.endswith(".base_layer.weight") for key in keys):
        return ""
    return ("; these are base-layer weights PEFT saves when lm_head or the embeddings are targeted "
            "(save_embedding_layers). If the base model's vocabulary was not resized or changed, re-save the "
            "adapter with save_pretrained(..., save_embedding_layers=False); otherwise load it with PEFT")


def _read_legacy(path: Path) -> dict[str, torch.Tensor]:
    """A legacy PEFT `adapter_model.bin`: tensors only, never arbitrary pickled objects."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message is long; keep what it says was found ("Unsupported global: GLOBAL io.open ...")
        _, _, found = str(error).partition("WeightsUnpickler error:")
        detail = next((line.strip() for line in found.splitlines() if line.strip()), type(error).__name__)
        detail = detail.split(" was not an allowed global")[0]
        raise ValueError(
            f"{path} holds pickled objects other than tensors ({detail}); refusing to unpickle them. "
            "Load it only if you trust its source and re-save it as adapter_model.safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:  # torch's own errors for damaged archives
        raise ValueError(f"{path} is truncated or corrupted ({error}); re-save or re-download the adapter") from None
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise ValueError(f"{path} must hold a dict of name -> tensor, got {type(state).__name__}; not a PEFT adapter")
    return state


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    check_finite: bool = False,
) -> nn.Module:
    """Load a PEFT-format MiSS adapter into `model` as `adapter_name`; returns `model`.

    Layers that lack the adapter get it from the checkpoint's config first, and modules_to_save
    their trainable copy. Shapes, variant and key coverage are checked and every mismatch named
    before anything is written (check_finite: in the dtype each tensor is stored in); on failure
    the model is left exactly as it was.
    """
    checkpoint = read_checkpoint(directory)
    config = checkpoint.config
    injected = not layers_with(model, adapter_name)
    trainable = {param: param.requires_grad for param in model.parameters()}
    if injected:
        apply_miss(model, config, adapter_name)
    unwrap = None
    try:
        unwrap = wrap_modules_to_save(model, config, adapter_name)
        pairs = checked_pairs(model, checkpoint, adapter_name, check_finite, directory)
        with torch.no_grad():
            for target, tensor in pairs:
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))
    except BaseException:
        if unwrap is not None:
            unwrap()
        if injected:
            _remove_adapter(model, adapter_name)
        for param, flag in trainable.items():
            param.requires_grad_(flag)
        raise
    warn_if_other_base_class(model, checkpoint.fields, directory)
    return enable_adapter_selection(model)


def _finite_problem(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Why `tensor` is not finite once stored as `dtype` (the file's values, or the cast), else None."""
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        return (f"{key}: holds NaN or Inf ({bad} of {tensor.numel()} values of {tuple(tensor.shape)}); "
                "the checkpoint is damaged or diverged: re-save or re-download it")
    cast = tensor.to(dtype)
    if not torch.isfinite(cast).all():
        bad = int((~torch.isfinite(cast)).sum())
        return (f"{key}: {bad} of {tensor.numel()} values (largest {tensor.abs().max().item():.3g}) overflow the "
                f"model's {dtype} (max {torch.finfo(dtype).max:.3g}) and would become Inf; load into a model whose "
                "adapter is float32 or bfloat16, or fix the checkpoint")
    return None


def checked_pairs(
    model: nn.Module, checkpoint: AdapterCheckpoint, adapter_name: str, check_finite: bool, directory: str | os.PathLike
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(the model's tensor, the checkpoint's) for every block and modules_to_save tensor of
    `adapter_name`, once every check of the checkpoint against the model passed (all problems named
    at once; check_finite: in the dtype each tensor is stored in). Nothing is written."""
    layers = layers_with(model, adapter_name)
    _check_blocks(layers, checkpoint.blocks, checkpoint.config, adapter_name, check_finite, directory)
    targets = saved_targets(model_root(model), adapter_name)
    _check_saved_modules(targets, checkpoint.saved, adapter_name, check_finite, directory)
    pairs = [(layer.miss_block[adapter_name], checkpoint.blocks[name]) for name, layer in layers.items()]
    return pairs + [(target, checkpoint.saved[key]) for key, target in targets.items()]


def _coverage(
    model_keys: set[str], file_keys: set[str], key: Callable[[str], str], missing: str, unexpected: str
) -> list[str]:
    """The model's keys the file lacks and the file's keys the model lacks, each listed under its label."""
    lacking, extra = sorted(model_keys - file_keys), sorted(file_keys - model_keys)
    return ([f"{missing}: {[key(name) for name in lacking]}"] if lacking else []) + (
        [f"{unexpected}: {[key(name) for name in extra]}"] if extra else [])


def _refuse(problems: list[str], what: str) -> None:
    if problems:
        listing = "\n  ".join(problems)
        raise ValueError(f"cannot load {what}:\n  {listing}")


def _check_blocks(
    layers: dict[str, nn.Module],
    blocks: dict[str, torch.Tensor],
    config: MissConfig,
    adapter_name: str,
    check_finite: bool,
    directory: str | os.PathLike,
) -> None:
    """Every check of the blocks against the layers carrying `adapter_name`; all problems named at once."""
    problems = _coverage(set(layers), set(blocks), _key, "missing blocks for adapted layers",
                         f"blocks for layers without adapter {adapter_name!r}")
    for name in sorted(set(layers) & set(blocks)):
        layer, block = layers[name], blocks[name]
        target = layer.miss_block[adapter_name]
        expected = tuple(target.shape)
        if tuple(block.shape) != expected:
            problems.append(
                f"{_key(name)}: shape {tuple(block.shape)} in the file, {expected} in the model "
                f"(in_features={layer.in_features}, out_features={layer.out_features})"
            )
        if adapter_variant(layer, adapter_name) != config.variant:
            problems.append(
                f"{name}: the checkpoint is {config.variant!r}, the model's adapter "
                f"{adapter_name!r} is {adapter_variant(layer, adapter_name)!r}"
            )
        if adapter_name in layer.merged_adapters:
            problems.append(f"{name}: adapter {adapter_name!r} is merged; unmerge before loading new weights")
        if not block.is_floating_point():
            problems.append(f"{_key(name)}: dtype {block.dtype} is not floating point")
        elif check_finite and (problem := _finite_problem(_key(name), block, target.dtype)):
            problems.append(problem)
    _refuse(problems, f"adapter {adapter_name!r} from {directory}")


def _check_saved_modules(
    targets: dict[str, torch.Tensor],
    saved: dict[str, torch.Tensor],
    adapter_name: str,
    check_finite: bool,
    directory: str | os.PathLike,
) -> None:
    """The modules_to_save tensors of a checkpoint against the model's copies for `adapter_name`
    (`<module>.<param>` -> tensor, both): same keys, shapes, float-ness; all problems named at once."""
    problems = _coverage(set(targets), set(saved), lambda key: KEY_PREFIX + key,
                         "the model trains modules_to_save tensors the file lacks",
                         f"modules_to_save tensors for no module of the model that holds a copy for {adapter_name!r}")
    for key in sorted(set(targets) & set(saved)):
        target, tensor = targets[key], saved[key]
        if tuple(tensor.shape) != tuple(target.shape):
            problems.append(f"{KEY_PREFIX}{key}: shape {tuple(tensor.shape)} in the file, {tuple(target.shape)} in the model")
        if tensor.is_floating_point() != target.is_floating_point():
            problems.append(f"{KEY_PREFIX}{key}: dtype {tensor.dtype} in the file, {target.dtype} in the model")
        elif check_finite and tensor.is_floating_point() and (problem := _finite_problem(KEY_PREFIX + key, tensor, target.dtype)):
            problems.append(problem)
    _refuse(problems, f"adapter {adapter_name!r} (modules_to_save) from {directory}")


def _remove_adapter(model: nn.Module, adapter_name: str) -> None:
    tuner = peft_tuner(model)
    if tuner is not None:
        tuner.delete_adapter(adapter_name)
        return
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if getattr(child, "miss_block", None) is not None and adapter_name in child.miss_block:
                child.remove_adapter(adapter_name)
                if not child.miss_block:  # we wrapped it for this adapter: put the plain layer back
                    setattr(parent, child_name, child.base_layer)
            elif isinstance(child, SavedModule) and adapter_name in child.modules_to_save:
                child.remove_adapter(adapter_name)
                if not child.modules_to_save:
                    setattr(parent, child_name, child.original_module)
