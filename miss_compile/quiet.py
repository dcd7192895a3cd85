"""Library noise a user of our commands cannot act on, filtered narrowly (by logger and message).

    with quiet_library_noise():
        export_onnx(...)

Filtered: torch.onnx's "torchvision is not installed. Skipping torchvision::nms" lines (it lists
torchvision's ops whether or not a model uses them), torch.export's `LeafSpec` FutureWarning
(raised inside torch by its own pytree code) and torch.onnx's "The axis name: sequence will not be
used" UserWarning (two inputs sharing a dynamic axis, as input_ids and attention_mask do). Anything else, other FutureWarnings included, still shows.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

__all__ = ["quiet_library_noise", "NOISY_LOGGERS", "NOISY_WARNINGS"]

# logger name -> the start of the messages it logs that are dropped
NOISY_LOGGERS = {"torch.onnx._internal.exporter._registration": "torchvision is not installed"}
# (message regex, category) of the warnings that are ignored
NOISY_WARNINGS = [
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # torch.onnx renaming dynamic axes that torch.export already found equal (batch/sequence of every input)
    (r"# The axis name: .* will not be used, since it shares the same shape constraints", UserWarning),
]


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def quiet_library_noise() -> Iterator[None]:
    """Inside: the messages in NOISY_LOGGERS and NOISY_WARNINGS are dropped; all else is untouched."""
    filters = [(logging.getLogger(name), _DropMessages(prefix)) for name, prefix in NOISY_LOGGERS.items()]
    for logger, dropped in filters:
        logger.addFilter(dropped)
    try:
        with warnings.catch_warnings():
            for message, category in NOISY_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger, dropped in filters:
            logger.removeFilter(dropped)
