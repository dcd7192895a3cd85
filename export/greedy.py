"""What transformers' generate does to the logits before its greedy pick, so session.generate picks
the same tokens. A model's generation_config can ask for it (Qwen2-Instruct ships
repetition_penalty 1.05): the export records those settings in the graph (export.provenance), and
generate builds transformers' own logits processors from them, in transformers' order
(`GenerationMixin._get_logits_processor`). Settings that need more than the token ids (the model,
a tokenizer) are refused by name rather than left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers.generation import logits_process as processors

__all__ = ["SETTINGS", "greedy_settings", "logits_processors"]

# generation_config fields that change a greedy pick, and their neutral values (the field left out)
SETTINGS: dict[str, tuple] = {
    "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "remove_invalid_values": (None, False),
    "exponential_decay_length_penalty": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
}
# ... and the ones generate cannot rebuild from token ids alone
_REFUSED = {
    "sequence_bias": (None,),
    "guidance_scale": (None, 1, 1.0),
    "watermarking_config": (None,),
    "stop_strings": (None,),
}


def _active(config: Mapping[str, Any] | Any, fields: dict[str, tuple]) -> dict[str, Any]:
    get = config.get if isinstance(config, Mapping) else lambda name: getattr(config, name, None)
    return {name: get(name) for name, neutral in fields.items() if get(name) not in neutral}


def greedy_settings(generation_config: Any) -> dict[str, Any]:
    """The fields of a GenerationConfig that change greedy tokens, neutral ones left out (JSON-ready:
    recorded in the graph). Refused fields are kept, as their names, so generate can refuse them."""
    if generation_config is None:
        return {}
    settings = _active(generation_config, SETTINGS)
    refused = _active(generation_config, _REFUSED)
    return {**settings, **({"refused": sorted(refused)} if refused else {})}


def logits_processors(settings: Mapping[str, Any], eos: torch.Tensor, prompt_mask: torch.Tensor,
                      max_new_tokens: int) -> processors.LogitsProcessorList:
    """transformers' processors for `settings` (greedy_settings), in its order, for left-padded
    prompts `prompt_mask` [batch, prompt] and eos ids `eos` [n]."""
    if settings.get("refused"):
        raise NotImplementedError(
            f"generate: the model's generation_config sets {settings['refused']}, which change transformers' tokens "
            "and which session.generate cannot apply from token ids alone; set them to None on "
            "model.generation_config before export (or generate with transformers)")
    unknown = sorted(set(settings) - set(SETTINGS) - {"refused"})
    if unknown:
        raise TypeError(f"generate: unknown generation settings {unknown}; it applies {sorted(SETTINGS)}")
    prompt = prompt_mask.shape[1]
    has_eos = eos.numel() > 0
    made = processors.LogitsProcessorList()
    get = {name: settings.get(name) for name in SETTINGS}
    if get["repetition_penalty"] not in SETTINGS["repetition_penalty"]:
        padding = (prompt_mask != 0).int().argmax(dim=1)  # as transformers: left padding is not penalized
        made.append(processors.RepetitionPenaltyLogitsProcessor(float(get["repetition_penalty"]), padding))
    if get["no_repeat_ngram_size"] not in SETTINGS["no_repeat_ngram_size"]:
        made.append(processors.NoRepeatNGramLogitsProcessor(int(get["no_repeat_ngram_size"])))
    if get["bad_words_ids"] is not None:
        made.append(processors.NoBadWordsLogitsProcessor(get["bad_words_ids"], eos if has_eos else None))
    if has_eos and get["min_length"] not in SETTINGS["min_length"]:
        made.append(processors.MinLengthLogitsProcessor(int(get["min_length"]), eos))
    if has_eos and get["min_new_tokens"] not in SETTINGS["min_new_tokens"]:
        made.append(processors.MinNewTokensLengthLogitsProcessor(prompt, int(get["min_new_tokens"]), eos))
    if get["forced_bos_token_id"] is not None:
        made.append(processors.ForcedBOSTokenLogitsProcessor(int(get["forced_bos_token_id"])))
    if get["forced_eos_token_id"] is not None:
        made.append(processors.ForcedEOSTokenLogitsProcessor(prompt + max_new_tokens, get["forced_eos_token_id"]))
    if get["remove_invalid_values"] is True:
        made.append(processors.InfNanRemoveLogitsProcessor())
    if get["exponential_decay_length_penalty"] is not None:
        made.append(processors.ExponentialDecayLengthPenalty(
            tuple(get["exponential_decay_length_penalty"]), eos, prompt))
    if get["suppress_tokens"] is not None:
        made.append(processors.SuppressTokensLogitsProcessor(get["suppress_tokens"]))
    if get["begin_suppress_tokens"] is not None:
        begin = prompt if prompt > 1 or get["forced_bos_token_id"] is None else prompt + 1
        made.append(processors.SuppressTokensAtBeginLogitsProcessor(get["begin_suppress_tokens"], begin))
    return made
