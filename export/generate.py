"""Greedy generation on onnxruntime: prefill, then one token per step with the graph's KV cache.

    session = load_session("model.onnx", device="cuda")        # exported with export_causal_lm
    tokens = session.generate(ids, attention_mask=mask, max_new_tokens=64, adapter="b.onnx_adapter")

What transformers' `generate(do_sample=False)` does, step for step: left-padded rows take positions
from the mask's cumsum, every step appends a one to the mask, a row that produced an eos token is
padded from then on, and generation ends when every row has finished. The present of one step is
the past of the next: on CUDA both stay on the device (the session's IO binding), with no host copy
per token. A graph without a cache (a plain export) runs the whole sequence again at every step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .causal_lm import KINDS, past_name, positions_from_mask, present_name
from .greedy import SETTINGS, logits_processors
from .provenance import recorded_generation

if TYPE_CHECKING:
    from .runtime import AdapterFile, MissSession

__all__ = ["generate"]

@torch.no_grad()
def generate(
    session: MissSession,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    adapter: str | os.PathLike | AdapterFile | None = None,
    eos_token_id: int | Sequence[int] | torch.Tensor | None = None,
    pad_token_id: int | torch.Tensor | None = None,
    do_sample: bool = False,
    adapter_ids: torch.Tensor | None = None,
    partial: bool = False,
    **settings: object,
) -> torch.Tensor:
    """Token ids [batch, prompt + new] (on the CPU), greedy. `attention_mask` [batch, prompt]: zeros
    on the left of shorter prompts (left padding); None means no padding. `adapter`: an
    `.onnx_adapter` for an unmerged graph (read once, fed at every step); `adapter_ids` [batch]: one
    adapter per row for a stacked graph. Rows that produce `eos_token_id` are filled with
    `pad_token_id` until every row has finished.

    As transformers' generate does, the model's generation_config (as recorded in the graph at
    export) gives the defaults: eos and pad ids (pad falls back to the first eos; eos_token_id=[]
    stops at no token) and the settings that change greedy tokens (`settings`: repetition_penalty,
    min_new_tokens, suppress_tokens, ... export.greedy.SETTINGS; a keyword here overrides the record,
    None turns one off). Ids may be ints, numpy ints or tensors. `max_new_tokens` is this call's own
    (the model's max_length is not read); a later change to the model's generation_config does not
    reach a graph exported before it."""
    if do_sample:
        raise NotImplementedError(
            "session.generate is greedy (do_sample=False); to sample, run the graph step by step with "
            "session.run and draw from the logits, or serve the model with onnxruntime-genai")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"generate: input_ids must be an integer tensor [batch, prompt], got {shape}")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens}; ask for at least one token")
    input_ids = input_ids.cpu().long()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"generate: attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids "
                         f"{tuple(input_ids.shape)}")
    attention_mask = attention_mask.cpu().long()
    if (attention_mask[:, -1] == 0).any():
        raise ValueError("generate: a prompt ends with padding (attention_mask 0 in the last column); pad prompts on "
                         "the left (tokenizer.padding_side = 'left'), as transformers' generate expects")
    recorded = recorded_generation(session.metadata) or {}
    eos, pad_token_id = _stop_ids(recorded, eos_token_id, pad_token_id)
    rules = logits_processors(_settings(recorded, settings), eos, attention_mask, max_new_tokens)
    if isinstance(adapter, (str, os.PathLike)):
        adapter = session.load_adapter(adapter, partial)  # read and checked once, not at every step
    extra = {} if adapter_ids is None else {"adapter_ids": adapter_ids}
    step = _Stepper(session, adapter, partial, extra)

    tokens, mask = input_ids, attention_mask
    unfinished = torch.ones(len(tokens), dtype=torch.bool)
    logits = step.prefill(tokens, mask)
    for produced in range(max_new_tokens):
        next_tokens = rules(tokens, logits.float().cpu()).argmax(-1)
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        unfinished &= ~torch.isin(next_tokens, eos)
        if not unfinished.any() or produced == max_new_tokens - 1:
            break
        logits = step.decode(tokens, mask)
    return tokens


def _settings(recorded: dict, given: dict[str, object]) -> dict[str, object]:
    """The recorded greedy settings with this call's keywords over them (None: off)."""
    unknown = sorted(set(given) - set(SETTINGS))
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments {unknown}; the generation settings it applies "
                        f"are {sorted(SETTINGS)}")
    merged = {**recorded.get("settings", {}), **given}
    return {name: value for name, value in merged.items() if value is not None}


def _stop_ids(recorded: dict, eos_token_id: object, pad_token_id: object) -> tuple[torch.Tensor, int]:
    """The eos ids [n] and the pad id: as given, else as the graph records them (older graphs record
    none: no eos); pad falls back to the first eos, then 0."""
    eos = _token_ids("eos_token_id", recorded.get("eos_token_id") if eos_token_id is None else eos_token_id)
    pad = _token_ids("pad_token_id", recorded.get("pad_token_id") if pad_token_id is None else pad_token_id)
    if pad.numel() > 1 or (pad_token_id is not None and not pad.numel()):
        raise ValueError(f"generate: pad_token_id must be one id, got {pad_token_id!r}")
    return eos, int(pad[0]) if pad.numel() else int(eos[0]) if eos.numel() else 0


def _token_ids(name: str, value: object) -> torch.Tensor:
    """Token ids as a 1-D int64 tensor from an int, a numpy int, a tensor or a list of them (None: none)."""
    try:
        ids = torch.as_tensor([] if value is None else value)
    except (TypeError, ValueError, RuntimeError):
        ids = None
    if ids is None or ids.dim() > 1 or (ids.numel() and not _is_integer(ids.dtype)):
        raise TypeError(f"generate: {name} must be an integer token id or a flat list of them, got {value!r}")
    return ids.flatten().long().cpu()


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


class _Stepper:
    """One graph run per step; keeps the present of each step as the past of the next."""

    def __init__(self, session: MissSession, adapter: object, partial: bool, extra: dict[str, torch.Tensor]) -> None:
        self.session, self.adapter, self.partial, self.extra = session, adapter, partial, extra
        inputs = {i.name: i for i in session.session.get_inputs()}
        self.layers = 0  # cache inputs are numbered from 0
        while past_name(self.layers, "key") in inputs:
            self.layers += 1
        missing = sorted({"input_ids", "attention_mask"} - set(inputs))
        if missing:
            raise ValueError(f"generate: the graph takes {sorted(inputs)}, without {missing}; export it with "
                             "export_causal_lm (or export_onnx(..., with_past=True))")
        self.position_ids = "position_ids" in inputs
        self.past_names = [past_name(layer, kind) for layer in range(self.layers) for kind in KINDS]
        self.present = [session.output_names.index(present_name(layer, kind)) for layer in range(self.layers)
                        for kind in KINDS]
        self.logits = session.output_names.index("logits")
        self.past: list[torch.Tensor] = []
        if self.layers:
            first = inputs[self.past_names[0]]
            _, self.kv_heads, _, self.head_dim = first.shape
            self.dtype = session.input_dtype(first.name)

    def prefill(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch = len(tokens)
        empty = torch.zeros(batch, self.kv_heads, 0, self.head_dim, dtype=self.dtype) if self.layers else None
        self.past = [empty] * (2 * self.layers)
        return self._run(tokens, mask, positions_from_mask(mask))

    def decode(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self.layers:  # no cache: the whole sequence again
            return self._run(tokens, mask, positions_from_mask(mask))
        return self._run(tokens[:, -1:], mask, positions_from_mask(mask)[:, -1:])

    def _run(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The last position's logits [batch, vocab]; the presents become the next past."""
        feeds = {"input_ids": tokens, "attention_mask": mask, **self.extra}
        if self.position_ids:
            feeds["position_ids"] = positions
        feeds.update(zip(self.past_names, self.past, strict=True))
        outputs = self.session.run(feeds, adapter=self.adapter, partial=self.partial)
        self.past = [outputs[index] for index in self.present]
        return outputs[self.logits][:, -1]
