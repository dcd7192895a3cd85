"""The KV-cache export (export_causal_lm, export_onnx(with_past=True)): a decoder-only causal LM (PEFT MiSS, ours, or plain) to one ONNX graph with a KV cache.

    inputs   input_ids [batch, sequence] int64, attention_mask [batch, past_sequence + sequence] int64,
             position_ids [batch, sequence] int64 (models whose forward takes them),
             past_key_values.{i}.key / .value [batch, kv_heads, past_sequence, head_dim], i = 0..layers-1
             (adapter_ids [batch] int64 for stacked exports)
    outputs  logits [batch, sequence, vocab], present.{i}.key / .value [batch, kv_heads, past_sequence + sequence, head_dim]

One graph serves prefill (past_sequence 0: feed [batch, kv_heads, 0, head_dim] tensors) and decode
(sequence 1). torch.export specializes sizes 0 and 1, so the graph is traced with a past of 4 and a
sequence of 3 and then validated on onnxruntime at past 0 (a left-padded prefill), at sequence 1 (a
decode step) and at other sizes. The model runs on transformers' DynamicCache built from the flat
tensors (one full layer per decoder layer; sliding-window models mask the window, the cache keeps
every position). Merged, unmerged (blocks as overridable initializers, so `.onnx_adapter` files swap
adapters) and stacked (`adapter_ids`) exports work as in export_onnx, which does the export.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from miss_compile.peft_compat import from_peft, model_root

__all__ = ["cache_export", "CacheExport", "CacheLayout", "cache_layout", "past_name", "present_name", "positions_from_mask", "flat_cache_base",
           "KINDS"]

KINDS = ("key", "value")
# distinct, none 0 or 1 (torch.export specializes those); mask lengths (7; 5, 7, 9 in the checks) unlike common
# kv head counts, since validation finds a present's sequence axis by the mask's length
_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE, _EXAMPLE_PAST = 2, 3, 4


def past_name(layer: int, kind: str) -> str:
    """Graph input of one layer's cached keys or values: `past_key_values.{layer}.{kind}`."""
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """Graph output of one layer's keys or values after the step: `present.{layer}.{kind}`."""
    return f"present.{layer}.{kind}"


@dataclass(frozen=True)
class CacheLayout:
    """What the cache of a causal LM looks like: per layer a key and a value [batch, kv_heads, length, head_dim]."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    position_ids: bool  # the model's forward takes position_ids (a graph input then)

    @property
    def input_names(self) -> list[str]:
        positions = ["position_ids"] if self.position_ids else []
        return ["input_ids", "attention_mask", *positions, *(past_name(i, k) for i in range(self.layers) for k in KINDS)]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *(present_name(i, k) for i in range(self.layers) for k in KINDS)]


def _argument(name: str) -> str:
    """The forward argument carrying graph input `name` (Python names cannot hold dots)."""
    return name.replace(".", "_")


def _refuse_non_causal(root: nn.Module) -> None:
    config = getattr(root, "config", None)
    can_generate = callable(getattr(root, "can_generate", None)) and root.can_generate()
    takes_cache = "cache" in inspect.signature(root.forward).parameters
    if not can_generate or not takes_cache or getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"export_causal_lm (with_past=True): {type(root).__name__} is not a decoder-only causal LM with a KV cache (an encoder, or a "
            "model without transformers' `cache` argument); supported are transformers *ForCausalLM / *LMHeadModel "
            "decoders on DynamicCache (Llama, Qwen2, Mistral, GPT-2 and alike). Export it without with_past")


@torch.no_grad()
def cache_layout(model: nn.Module) -> CacheLayout:
    """Layers, kv heads and head size of `model`'s cache, read from one step of the model on a DynamicCache."""
    root = model_root(model)
    _refuse_non_causal(root)
    device = next(root.parameters()).device
    cache = DynamicCache()
    root(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), cache=cache, use_cache=True)
    if not cache.layers or any(type(layer) is not DynamicLayer or layer.keys is None or layer.keys.dim() != 4
                               for layer in cache.layers):
        raise ValueError(f"export_causal_lm (with_past=True): {type(root).__name__} keeps a cache that is not one key and value "
                         f"[batch, kv_heads, length, head_dim] per layer ({[type(layer).__name__ for layer in cache.layers]}); "
                         "supported are decoders on transformers' DynamicCache (Llama, Qwen2, Mistral, GPT-2, ...)")
    keys = cache.layers[0].keys
    return CacheLayout(layers=len(cache.layers), kv_heads=keys.shape[1], head_dim=keys.shape[3], dtype=keys.dtype,
                       position_ids="position_ids" in inspect.signature(root.forward).parameters)


def _take_flat_cache(model: nn.Module, layout: CacheLayout, extra: list[str]) -> None:
    """Give `model` (a copy) a class whose forward takes the graph's inputs as flat tensors, runs the model on
    a DynamicCache built from them and returns {logits, present.{i}.key/value}. A subclass, not a wrapper:
    parameter names (hence block input names) stay the model's, and export_onnx's copies keep the forward."""
    base = type(model)
    arguments = [_argument(name) for name in layout.input_names]

    def forward(self: nn.Module, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        past = [(inputs.pop(_argument(past_name(i, "key"))), inputs.pop(_argument(past_name(i, "value"))))
                for i in range(layout.layers)]
        output = base.forward(self, **inputs, cache=DynamicCache(past), use_cache=True)
        presents = {present_name(i, kind): tensor for i, layer in enumerate(output.cache.layers)
                    for kind, tensor in zip(KINDS, (layer.keys, layer.values), strict=True)}
        return {"logits": output.logits, **presents}

    forward.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in ["self", *arguments, *extra]])
    model.__class__ = type(f"{base.__name__}WithPast", (base,), {"forward": forward, "__module__": __name__,
                                                                 "_flat_cache": True})


def flat_cache_base(model: nn.Module) -> type | None:
    """The model's own class when `model` was given the flat-cache forward above, else None."""
    return type(model).__bases__[0] if getattr(type(model), "_flat_cache", False) else None


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """transformers' position ids for a left-padded mask [batch, length]: real tokens before, 1 on padding."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _step_inputs(layout: CacheLayout, mask: torch.Tensor, sequence: int, device: torch.device, vocab: int,
                 seed: int) -> dict[str, torch.Tensor]:
    """Forward arguments for one step: `sequence` new tokens after a past of mask.shape[1] - sequence."""
    generator = torch.Generator().manual_seed(seed)
    batch, past = mask.shape[0], mask.shape[1] - sequence
    inputs = {"input_ids": torch.randint(0, vocab, (batch, sequence), generator=generator), "attention_mask": mask}
    if layout.position_ids:
        inputs["position_ids"] = positions_from_mask(mask)[:, past:]
    for i in range(layout.layers):
        for kind in KINDS:
            value = torch.randn(batch, layout.kv_heads, past, layout.head_dim, generator=generator)
            inputs[_argument(past_name(i, kind))] = value.to(layout.dtype)
    return {name: value.to(device) for name, value in inputs.items()}


def _left_padded(lengths: list[int], total: int) -> torch.Tensor:
    return torch.stack([torch.arange(total) >= total - length for length in lengths]).long()


@dataclass
class CacheExport:
    """What export_onnx needs to trace a causal LM with its cache: the model taking flat tensors, the
    example, the graph's names and dynamic shapes, and the sizes validated besides (past 0, sequence 1)."""

    module: nn.Module
    example: dict[str, torch.Tensor]
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: dict[str, Any]
    validation_inputs: list[dict[str, torch.Tensor]]


def cache_export(model: nn.Module, adapter_ids: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None) -> CacheExport:
    """The KV-cache export of `model` (see the module docstring for the graph); refuses what has no cache.
    `adapter_ids` (stacked models): an example [batch] of ids, which makes adapter_ids a graph input."""
    _refuse_non_causal(model_root(model))
    copy = from_peft(model)  # our layers; the class swap below changes this copy only
    copy.eval()
    if dtype is not None:
        copy.to(dtype)
    layout = cache_layout(copy)
    extra = [] if adapter_ids is None else ["adapter_ids"]
    _take_flat_cache(copy, layout, extra)
    device = next(copy.parameters()).device
    vocab = copy.config.get_text_config().vocab_size
    batch, sequence, past = _EXAMPLE_BATCH, _EXAMPLE_SEQUENCE, _EXAMPLE_PAST
    example = _step_inputs(layout, torch.ones(batch, past + sequence, dtype=torch.long), sequence, device, vocab, 0)
    checks = [
        _step_inputs(layout, _left_padded([5, 3, 1], 5), 5, device, vocab, 1),  # prefill, past 0, left-padded
        _step_inputs(layout, _left_padded([7, 4, 2], 7), 1, device, vocab, 2),  # decode: sequence 1, past 6
        _step_inputs(layout, _left_padded([4, 9, 6, 9], 9), 2, device, vocab, 3),  # 2 tokens on a past of 7
    ]
    if adapter_ids is not None:
        for inputs in [example, *checks]:  # the example's ids, repeated to each batch
            rows = inputs["input_ids"].shape[0]
            inputs["adapter_ids"] = adapter_ids.to(device).repeat(rows)[:rows]
    return CacheExport(copy, example, [*layout.input_names, *extra], layout.output_names,
                       _dynamic_shapes(layout, extra), checks)


def _dynamic_shapes(layout: CacheLayout, extra: list[str]) -> dict[str, Any]:
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    past, total = torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence")
    shapes: dict[str, Any] = {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: total}}
    if layout.position_ids:
        shapes["position_ids"] = {0: batch, 1: sequence}
    for i in range(layout.layers):
        for kind in KINDS:
            shapes[_argument(past_name(i, kind))] = {0: batch, 2: past}
    shapes.update({name: {0: batch} for name in extra})
    return shapes
