"""What an export takes: the model's inputs by name, which of their dims are dynamic, the feeds a
session gets, and the other inputs validation runs (another size, padded batches).

One rule for input order: the graph's user inputs are the tensor leaves of `(args, kwargs)` in the
order they were passed (torch.export keeps that order, names and all), so feeds pair the session's
input names with those leaves, renamed or not.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

__all__ = ["bound_inputs", "named_inputs", "dynamic_dims", "dynamic_shapes", "graph_input_leaves", "feeds",
           "other_size", "resized", "padded", "attention_mask", "cast_inputs", "text_inputs",
           "with_default_inputs", "MASK"]

MASK = "attention_mask"  # the input whose zeros mark padding: validation compares only the positions it keeps


def bound_inputs(model: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of `model.forward` by name, as the call binds them (`**kwargs` under its own name)."""
    return dict(inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments)


def named_inputs(model: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Every input by name, `**kwargs` of the model's forward spread out (HF models take them so)."""
    parameters = inspect.signature(model.forward).parameters
    inputs: dict[str, Any] = {}
    for name, value in bound_inputs(model, args, kwargs).items():
        if parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            inputs.update(value)
        else:
            inputs[name] = value
    return inputs


def dynamic_dims(value: torch.Tensor, name: str = "") -> dict[int, str]:
    """Batch (dim 0) and sequence (dim 1); a float input's last dim is features and stays static
    (ids and masks [batch, seq], hidden states [batch, seq, features], rows [batch, features])."""
    features = value.is_floating_point() and "mask" not in name
    rank = value.dim() - 1 if features else value.dim()
    return {dim: label for dim, label in ((0, "batch"), (1, "sequence")) if dim < rank}


def dynamic_shapes(model: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Batch and sequence of every tensor input are dynamic (see dynamic_dims)."""
    shapes: dict[str, Any] = {}
    for name, value in bound_inputs(model, args, kwargs).items():
        dims = dynamic_dims(value, name) if isinstance(value, torch.Tensor) else {}
        if any(value.shape[dim] < 2 for dim in dims):
            # torch.export specializes sizes 0 and 1: the graph would only take that size.
            raise ValueError(
                f"example input {name!r} has shape {tuple(value.shape)}; a dynamic export needs batch and "
                "sequence sizes >= 2 in the example (or pass dynamic=False)"
            )
        shapes[name] = dims or None
    return shapes


def graph_input_leaves(args: tuple, kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    """The tensors the graph takes as user inputs, in its order (None and Python scalars are not inputs)."""
    return [leaf for leaf in tree_leaves((tuple(args), dict(kwargs))) if isinstance(leaf, torch.Tensor)]


def feeds(input_names: list[str], args: tuple, kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Graph input name -> tensor, for a session whose user inputs are `input_names`."""
    leaves = graph_input_leaves(args, kwargs)
    if len(leaves) != len(input_names):
        raise ValueError(f"the graph takes {len(input_names)} inputs {input_names}, and the example has "
                         f"{len(leaves)} tensors; pass the inputs the model was exported with")
    return dict(zip(input_names, leaves, strict=True))


def other_size(value: Any, name: str = "") -> Any:
    """The same input one batch row and two positions longer (ids stay in range, masks stay ones)."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    shape = list(value.shape)
    for dim in dynamic_dims(value, name):  # batch and sequence; a float input's features stay
        shape[dim] += 1 if dim == 0 else 2
    generator = torch.Generator().manual_seed(7)
    if "mask" in name:
        return torch.ones(shape, dtype=value.dtype)
    if value.is_floating_point():
        return torch.randn(shape, generator=generator).to(value.dtype)
    return torch.randint(0, int(value.max()) + 1, shape, generator=generator, dtype=value.dtype)


def _map_named(model: nn.Module, args: tuple, kwargs: Mapping[str, Any], change: Any) -> tuple[tuple, dict]:
    """`change(name, value)` on each top-level input, keeping positional and keyword places (and order)."""
    names = list(inspect.signature(model.forward).parameters)
    return (tuple(change(name, value) for name, value in zip(names, args, strict=False)),
            {name: change(name, value) for name, value in kwargs.items()})


def resized(model: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> tuple[tuple, dict]:
    """The inputs at another size (other_size on each), in the places they were passed."""
    return _map_named(model, args, kwargs, lambda name, value: other_size(value, name))


def attention_mask(model: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The 2-D padding mask [batch, length] among the inputs, if any."""
    mask = bound_inputs(model, args, kwargs).get(MASK, kwargs.get(MASK))
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def padded(model: nn.Module, args: tuple, kwargs: Mapping[str, Any], side: str) -> tuple[tuple, dict] | None:
    """The inputs with a padded mask: row b keeps max(1, length - b) positions, the others are padding on
    `side` ("left" or "right"); rows of different real lengths. None without a mask of >= 2 rows and columns."""
    mask = attention_mask(model, args, kwargs)
    if mask is None or min(mask.shape) < 2:
        return None
    batch, length = mask.shape
    real = (length - torch.arange(batch, device=mask.device)).clamp(min=1)[:, None]  # [batch, 1]
    position = torch.arange(length, device=mask.device)[None, :]
    keep = position >= length - real if side == "left" else position < real
    padded_mask = torch.where(keep, torch.ones_like(mask), torch.zeros_like(mask))
    return _map_named(model, args, kwargs, lambda name, value: padded_mask if name == MASK else value)


def text_inputs(model: nn.Module, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Example inputs of a transformers text model: random `input_ids` [batch, seq], and the inputs its
    forward takes that padded batches need: `attention_mask` (ones), and `token_type_ids` (zeros) where
    the config has more than one token type (BERT-like); the graph then takes them too."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    takes = inspect.signature(model.forward).parameters
    inputs = {"input_ids": ids}
    if MASK in takes:
        inputs[MASK] = torch.ones_like(ids)
    if "token_type_ids" in takes and getattr(getattr(model, "config", None), "type_vocab_size", 0) > 1:
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


# What transformers assumes for an input left out, by name: no padding, one token type.
_DEFAULTS = {MASK: torch.ones_like, "token_type_ids": torch.zeros_like}


def with_default_inputs(given: Mapping[str, Any], graph_inputs: Sequence[Any]) -> dict[str, Any]:
    """`given` plus transformers' defaults for the graph inputs it leaves out: `attention_mask` all ones and
    `token_type_ids` zeros, shaped like `input_ids`, where the graph's input has input_ids' dims (a KV-cache
    mask over past + current does not, and is never filled in) and its type (a float mask is not filled in
    either). `graph_inputs`: onnxruntime's NodeArgs (name, shape, type)."""
    like = {arg.name: (list(arg.shape), arg.type) for arg in graph_inputs}
    ids = given.get("input_ids")
    if ids is None or "input_ids" not in like:
        return dict(given)
    filled = {name: fill(torch.as_tensor(ids)) for name, fill in _DEFAULTS.items()
              if name in like and name not in given and like[name] == like["input_ids"]}
    return {**given, **filled}


def cast_inputs(values: Any, dtype: torch.dtype | None) -> Any:
    """Floating tensors of a tuple or dict cast to `dtype` (None: unchanged); integer ones (ids) stay."""
    if dtype is None:
        return values
    cast = lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
    if isinstance(values, dict):
        return {k: cast(v) for k, v in values.items()}
    return tuple(cast(v) for v in values)
