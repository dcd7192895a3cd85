"""MiSS models under PyTorch's own data parallelism: DDP and FSDP2 (`fully_shard`), compiled with miss_backend.

    model = apply_miss(LlamaForCausalLM(config), MissConfig(r=8))   # or a PEFT MiSS model
    train_model = wrap_ddp(model)            # whole model compiled, or compile="block"
    train_model = shard_fsdp2(model)         # each decoder block sharded and compiled, then the root
    optimizer = torch.optim.AdamW(trainable_blocks(model), lr=1e-3)   # after wrapping (FSDP2: DTensors)
    save_adapter_distributed(model, "adapter/")   # every rank calls it; rank 0 writes PEFT's layout
    load_adapter_sharded(train_model, "adapter/") # into a wrapped or sharded model (or load_adapter before)

What goes over the wire (torch 2.13):
- DDP broadcasts every parameter and buffer from rank 0 once, at construction (`init_sync`),
  frozen base weights included. In backward it all-reduces (averages) only the gradients of
  parameters with `requires_grad`: the MiSS blocks. `forward_sync_buffers=False`: the buffers of a
  transformers model (rotary `inv_freq`) are constants, so they are not re-broadcast every step.
- FSDP2 shards every parameter of a unit, frozen ones included (that is what saves the memory).
  Each step it all-gathers a unit's parameters (frozen base weights and blocks) before its forward,
  again before its backward (`reshard_after_forward=True`), and reduce-scatters (averages) only
  the gradients that exist: the blocks'. Gloo runs these collectives on CPU.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from .backend import miss_backend
from .checkpoint import checked_pairs, config_of, modules_to_save_of, read_checkpoint, write_adapter
from .peft_compat import layers_with, model_root
from .saved_modules import is_saved_module_parameter, saved_targets

__all__ = [
    "wrap_ddp",
    "shard_fsdp2",
    "transformer_blocks",
    "trainable_blocks",
    "gather_adapter",
    "save_adapter_distributed",
    "load_adapter_sharded",
]

logger = logging.getLogger(__name__)

Compile = Literal["model", "block", "none"]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (its `_no_split_modules` classes, e.g. LlamaDecoderLayer)."""
    root = model_root(model)
    names = set(getattr(root, "_no_split_modules", None) or ())
    blocks = [module for module in root.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(
            f"{type(root).__name__} names no transformer block class (_no_split_modules={sorted(names)}); "
            "pass blocks=[...] (the modules to shard and compile one by one)"
        )
    return blocks


def trainable_blocks(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train: MiSS blocks and the adapters' modules_to_save copies (a classifier
    head), what DDP and FSDP2 then reduce."""
    params = {name: param for name, param in model.named_parameters() if param.requires_grad}
    others = [name for name in params if ".miss_block." not in f".{name}." and not is_saved_module_parameter(name)]
    if others:
        raise ValueError(
            f"trainable parameters that are not MiSS blocks: {others[:5]}{' ...' if len(others) > 5 else ''}; "
            "freeze them (requires_grad_(False); apply_miss and PEFT do), or name their modules in "
            "MissConfig.modules_to_save: wrap_ddp and shard_fsdp2 reduce MiSS blocks and modules_to_save copies only"
        )
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable MiSS block; add one with apply_miss or load_adapter")
    return list(params.values())


def wrap_ddp(model: nn.Module, compile: Compile = "model", backend: Any = miss_backend,
             blocks: list[nn.Module] | None = None, **ddp_kwargs: Any) -> nn.Module:
    """DDP around `model`, compiled whole (`compile="model"`: DDP's optimizer splits the graph at
    gradient buckets) or block by block. Call it inside an initialized process group."""
    _check_compile(compile, ("model", "block", "none"), "wrap_ddp")
    trainable_blocks(model)
    if compile == "block":
        for block in blocks or transformer_blocks(model):
            block.compile(backend=backend)
    ddp_kwargs.setdefault("forward_sync_buffers", False)
    wrapped = DistributedDataParallel(model, **ddp_kwargs)
    return torch.compile(wrapped, backend=backend) if compile == "model" else wrapped


def shard_fsdp2(model: nn.Module, compile: Compile = "block", backend: Any = miss_backend,
                blocks: list[nn.Module] | None = None, **fsdp_kwargs: Any) -> nn.Module:
    """FSDP2 as its docs recommend: `fully_shard` and compile each transformer block, then shard the
    root. `model` is sharded in place and returned; build the optimizer afterwards (DTensor blocks)."""
    from torch.distributed.fsdp import fully_shard

    _check_compile(compile, ("block", "none"), "shard_fsdp2")
    trainable_blocks(model)
    if "mesh" not in fsdp_kwargs:
        device = "cuda" if next(model.parameters()).is_cuda else "cpu"
        fsdp_kwargs["mesh"] = dist.device_mesh.init_device_mesh(device, (dist.get_world_size(),))
    for block in blocks or transformer_blocks(model):
        fully_shard(block, **fsdp_kwargs)
        if compile == "block":
            block.compile(backend=backend)
    fully_shard(model, **fsdp_kwargs)
    return model


def _check_compile(compile: str, allowed: tuple[str, ...], where: str) -> None:
    if compile not in allowed:
        why = " (FSDP2's hooks break a whole-model graph at every block: compile per block)" if compile == "model" else ""
        raise ValueError(f"{where}: compile={compile!r} is not one of {allowed}{why}")


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (DistributedDataParallel, torch._dynamo.eval_frame.OptimizedModule)):
        model = model.module if isinstance(model, DistributedDataParallel) else model._orig_mod
    return model


def gather_adapter(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Full blocks (layer name -> CPU tensor) of a DDP, FSDP2 or plain model; every rank must call it
    (one all-gather per sharded block, in the same order everywhere)."""
    layers = layers_with(_unwrap(model), adapter_name)
    if not layers:
        raise ValueError(f"no layer carries an adapter named {adapter_name!r}; nothing to gather")
    blocks = {}
    for name, layer in layers.items():
        block = layer.miss_block[adapter_name].detach()
        blocks[name] = _full(block)
    return blocks


def _full(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).cpu()


def _gather_saved(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's modules_to_save tensors (`<module>.<param>` -> full CPU tensor), gathered like blocks."""
    return {key: _full(value) for key, value in saved_targets(model_root(model), adapter_name).items()}


def save_adapter_distributed(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> Path:
    """save_adapter for a model trained under DDP or FSDP2: blocks gathered once, rank 0 writes PEFT's
    layout atomically, every rank returns once the files are in place. Every rank must call it."""
    inner = _unwrap(model)
    blocks = gather_adapter(inner, adapter_name)
    saved = _gather_saved(inner, adapter_name)
    directory = Path(directory)

    def write() -> None:
        config = config_of(layers_with(inner, adapter_name), adapter_name, modules_to_save_of(inner, adapter_name))
        write_adapter(directory, blocks, config, saved)

    if not dist.is_initialized():
        write()
        return directory
    failure = [None]
    if dist.get_rank() == 0:
        try:
            write()
            logger.info("saved adapter %r (%d blocks) to %s", adapter_name, len(blocks), directory)
        except Exception as error:  # every rank must learn it, or the others wait out the group's timeout
            failure = [f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(failure, src=0)
            raise
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise RuntimeError(f"rank 0 could not save adapter {adapter_name!r} to {directory}: {failure[0]}")
    return directory


def load_adapter_sharded(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                         check_finite: bool = False) -> nn.Module:
    """load_adapter for a model already wrapped by DDP or sharded by FSDP2 that carries `adapter_name`:
    every rank reads the folder and keeps its own shard of each block (no communication). The checks
    are load_adapter's (check_finite too), all made before any block is written."""
    from torch.distributed.tensor import distribute_tensor

    inner = _unwrap(model)
    if not layers_with(inner, adapter_name):
        raise ValueError(
            f"{type(inner).__name__} carries no adapter {adapter_name!r} to load into, and a wrapped or sharded "
            "model cannot grow one: load_adapter (or PeftModel.from_pretrained) before wrapping"
        )
    pairs = checked_pairs(inner, read_checkpoint(directory), adapter_name, check_finite, directory)
    with torch.no_grad():
        for target, tensor in pairs:
            tensor = tensor.to(device=target.device, dtype=target.dtype)
            if isinstance(target, DTensor):  # FSDP2: this rank's shard, cut as FSDP2 cut the parameter
                tensor = distribute_tensor(tensor, target.device_mesh, target.placements, src_data_rank=None)
            target.copy_(tensor)
    return model
