"""Graph-input names of the overridable MiSS tensors: one definition, used by the exporter, the
adapter files and the sessions.

    block: `<layer>.miss_block.<adapter>`  one adapter's block of one layer (unmerged exports)
    stack: `<layer>.miss_stack`            every stacked adapter's block of one layer (adapter_ids exports)
"""

from __future__ import annotations

__all__ = ["BLOCK_MARKER", "STACK_SUFFIX", "block_input_name", "stack_input_name", "is_block_input",
           "is_stack_input", "is_overridable_input", "split_block_input"]

BLOCK_MARKER = ".miss_block."
STACK_SUFFIX = ".miss_stack"


def block_input_name(layer: str, adapter: str) -> str:
    """The graph input holding `adapter`'s block of `layer` (a module name under the model root)."""
    return f"{layer}{BLOCK_MARKER}{adapter}"


def stack_input_name(layer: str) -> str:
    """The graph input holding `layer`'s adapter stack [adapters, r, out]."""
    return f"{layer}{STACK_SUFFIX}"


def is_block_input(name: str) -> bool:
    return BLOCK_MARKER in name


def is_stack_input(name: str) -> bool:
    return name.endswith(STACK_SUFFIX)


def is_overridable_input(name: str) -> bool:
    """A block or a stack: what an `.onnx_adapter` file or a per-run feed may replace."""
    return is_block_input(name) or is_stack_input(name)


def split_block_input(name: str) -> tuple[str, str]:
    """(layer, adapter) of a block input name."""
    layer, _, adapter = name.rpartition(BLOCK_MARKER)
    return layer, adapter
