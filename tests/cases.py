"""The cases the tests share, one table each, in PEFT's TEST_CASES style: tiny models by name, one
MiSS configuration per variant, the rows (test name, model, config kwargs) that cross them, the
tied-embedding models, and the shapes the op tests run."""

import pytest
from small_models import MODELS, tied_llama, tiny_gpt2

from miss_compile import MissConfig

# Every Linear of the tiny models (hidden 32, kv 16, intermediate 48): bat r=8 and mini_r=8 divide
# them all, r=3 divides none of 32 (balance pads).
VARIANTS = {
    "balance": dict(r=3, init="random", target_modules="all-linear"),
    "mini": dict(r=3, variant="mini", mini_r=8, target_modules="all-linear"),
    "bat": dict(r=8, variant="bat", target_modules="all-linear"),
}
CONFIGS = {variant: MissConfig(**kwargs) for variant, kwargs in VARIANTS.items()}

MODEL_NAMES = list(MODELS)
PEFT_MODELS = [name for name in MODELS if name != "gpt2"]  # PEFT's MiSS does not adapt GPT-2's Conv1D

# (test name, model for helpers.build / small_models.MODELS, MissConfig kwargs): every tiny model under every variant.
TEST_CASES = [(f"{model}-{variant}", model, kwargs) for model in MODELS for variant, kwargs in VARIANTS.items()]
PEFT_CASES = [case for case in TEST_CASES if case[1] in PEFT_MODELS]


def params(rows: list[tuple]) -> list:
    """Rows of (test name, model, config kwargs) as pytest parameters (model, config kwargs), named by the test name."""
    return [pytest.param(model, kwargs, id=name) for name, model, kwargs in rows]

# (model, embedding path, targets): an explicit target list selects the head ("all-linear" leaves it out).
TIED = {
    "llama": (tied_llama, "model.embed_tokens", ["lm_head", "q_proj"]),
    "gpt2": (tiny_gpt2, "transformer.wte", ["lm_head", "c_attn"]),
}
TIED_VARIANTS = {
    "balance": dict(r=3, init="random"),
    "mini": dict(r=4, variant="mini", mini_r=8),
    "bat": dict(r=8, variant="bat"),
}

# Op shapes: (in_features, out_features, block shapes, variants, leading dims, with bias).
LINEAR_CASES = {
    "balance": (16, 12, [(4, 12)], ["balance"], (5,), True),
    "balance-padded": (13, 12, [(4, 12)], ["balance"], (2, 3), True),
    "mini": (16, 12, [(4, 3)], ["mini"], (2, 3), False),
    "two-adapters": (13, 12, [(4, 12), (3, 6)], ["balance", "mini"], (2, 3), True),
    "r1-single-token": (7, 5, [(1, 5)], ["balance"], (1, 1), True),
}
BAT_CASES = {
    "bat": (16, 12, [(3, 4, 4)], ["bat"], (2, 3), True),
    "bat-two": (8, 12, [(3, 4, 4), (6, 2, 2)], ["bat", "bat"], (5,), False),
}
