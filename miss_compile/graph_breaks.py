"""Dynamo's graph-break record, read for what no backend sees: code Dynamo ran eagerly.

A region Dynamo cannot trace never reaches a backend, so the MiSS layers in it are neither compiled
nor rewritten, and nothing in the graphs a backend gets says so. Dynamo records why in
`torch._dynamo.utils.graph_break_reasons` (emptied by torch.compiler.reset()). An activation
checkpoint is the case that matters: a break anywhere inside one runs the whole checkpointed region
(a decoder layer) eagerly. Each backend reads every record once, and only records made after it.
"""

from __future__ import annotations

import re

import torch

__all__ = ["CHECKPOINT_SIDE_EFFECTS", "BreakLog", "side_effect_in_checkpoint", "inside_checkpoint", "describe"]

# Dynamo's hint for a side effect inside an activation checkpoint names this setting.
CHECKPOINT_SIDE_EFFECTS = "skip_fwd_side_effects_in_bwd_under_checkpoint"


def _recorded() -> list:
    return list(getattr(torch._dynamo.utils, "graph_break_reasons", []))


class BreakLog:
    """The graph breaks recorded since this log was made, handed out once each."""

    def __init__(self) -> None:
        self.read: list = _recorded()  # earlier breaks belong to other compiles

    def fresh(self) -> tuple[list, bool]:
        """(breaks recorded since the last call, whether torch.compiler.reset() ran in between: the
        record no longer holds the last break read)."""
        recorded = _recorded()
        reset = bool(self.read) and not any(item is self.read[-1] for item in recorded)
        if reset:
            self.read = []
        # The records read are kept alive here, so their ids stay theirs.
        read = {id(item) for item in self.read}
        new = [item for item in recorded if id(item) not in read]
        self.read += new
        return new, reset


def side_effect_in_checkpoint(item: object) -> bool:
    """A checkpointed forward changed Python state that Dynamo cannot check is restored (transformers
    >= 5.25's attention sets a context variable); CHECKPOINT_SIDE_EFFECTS lets Dynamo trace it."""
    return CHECKPOINT_SIDE_EFFECTS in str(getattr(item, "reason", ""))


# A call of something named for checkpointing: `checkpoint(`, `self._gradient_checkpointing_func(`.
_CHECKPOINT_CALL = re.compile(r"\w*checkpoint\w*\s*\(")


def inside_checkpoint(item: object) -> bool:
    """The break happened in code called through an activation checkpoint: a caller's line on its stack
    calls one (`torch.utils.checkpoint.checkpoint(...)`, transformers' `self._gradient_checkpointing_func(
    ...)`). Lines, not function names: transformers' `forward_with_checkpointing` wraps every decoder
    layer, checkpointing or not. Read from source: it picks a warning's words, never a rewrite."""
    callers = list(getattr(item, "user_stack", []))[:-1]
    return any(_CHECKPOINT_CALL.search(frame.line or "") for frame in callers)


def describe(item: object) -> str:
    """The break's first line and where it happened: 'Unsupported method call at transformers/x.py:98'."""
    reason = str(getattr(item, "reason", "")).strip().splitlines()
    stack = list(getattr(item, "user_stack", []))
    where = f" at {stack[-1].filename.split('site-packages/')[-1]}:{stack[-1].lineno}" if stack else ""
    return f"{reason[0] if reason else 'a graph break'}{where}"
