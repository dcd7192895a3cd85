"""Tiny models built from configs (no hub), and helpers shared by the tests."""

from __future__ import annotations

import copy
import os

# One compile thread: on a 2-core CI machine with one pytest-xdist worker per core, Inductor's
# pool of compile workers costs more in start-up than its parallel C++ builds save.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from fuzzing import Fuzzer  # noqa: E402  (registers and loads the hypothesis profiles)
from torch import nn  # noqa: E402

from miss_compile import adapters_disabled, set_active_adapters  # noqa: E402
from miss_compile.peft_compat import named_miss_layers  # noqa: E402

VOCAB = 64


# Decoders: hidden 32, kv 16, intermediate 48 (r = 3 divides none of 32; bat r = 8 divides all).
DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER))


def tiny_qwen2() -> nn.Module:
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**DECODER))


def tiny_mistral() -> nn.Module:
    return transformers.MistralForCausalLM(transformers.MistralConfig(**DECODER))


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64,
    )
    return transformers.BertModel(config)


def tiny_gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config)


MODELS = {
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "mistral": tiny_mistral,
    "bert": tiny_bert,
    "gpt2": tiny_gpt2,
}


def build(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().to(dtype).eval()


def input_ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=generator)


def model_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False) if _is_causal_lm(model) else model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@torch.no_grad()
def rows_alone(model, ids, names):
    """Each row run alone with its own adapter (None: adapters off): what the mixed batch must equal."""
    rows = []
    for row, name in enumerate(names):
        if name is None:
            with adapters_disabled(model):
                rows.append(model_output(model, ids[row:row + 1]))
        else:
            set_active_adapters(model, name)
            rows.append(model_output(model, ids[row:row + 1]))
    return torch.cat(rows)


def mixed(model, ids, **selection):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **selection).logits


def _is_causal_lm(model: nn.Module) -> bool:
    inner = getattr(getattr(model, "base_model", None), "model", model)
    return "CausalLM" in type(inner).__name__ or "LMHead" in type(inner).__name__


@torch.no_grad()
def randomize_blocks(model: nn.Module, adapter_name: str = "default", scale: float = 0.1, seed: int = 2) -> None:
    """Non-zero blocks (zero-initialized adapters would make every comparison trivial)."""
    generator = torch.Generator().manual_seed(seed)
    for layer in named_miss_layers(model).values():
        block = layer.miss_block[adapter_name]
        block.copy_(torch.randn(block.shape, generator=generator) * scale)


@torch.no_grad()
def copy_blocks(source: nn.Module, target: nn.Module, adapter_name: str = "default") -> None:
    source_layers, target_layers = named_miss_layers(source), named_miss_layers(target)
    assert source_layers.keys() == target_layers.keys()
    for name, layer in source_layers.items():
        target_layers[name].miss_block[adapter_name].copy_(layer.miss_block[adapter_name])


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


@pytest.fixture
def fuzz(request):
    """The shared hypothesis fuzzer (tests/fuzzing.py): derandomized in CI, timed under --soak."""
    return Fuzzer(request)


def pytest_addoption(parser):
    parser.addoption(
        "--soak", type=float, default=None, metavar="SECONDS",
        help="run the hypothesis fuzz tests (tests/test_fuzz.py, tests/test_lookalike_fuzz.py) for about SECONDS in all, with fresh random "
             "seeds, and report examples tried and failures (release check; CI runs them derandomized)",
    )


# The longest files start first, so that under pytest-xdist (whole files per worker) no single
# long test runs alone at the end while the other worker idles.
LONGEST_FIRST = ("test_benchmarks.py", "test_distributed.py", "test_backend.py", "test_export.py",
                 "test_export_state.py")


def _start_order(item) -> int:
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_start_order)  # stable: the order inside a file is kept
    if torch.cuda.is_available():
        return
    reason = "needs a CUDA device: run `./dev test -m cuda` on the GPU machine (benchmarks/gpu_check.sh)"
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _deterministic():
    # Every tiny Llama shares LlamaForCausalLM.forward: without a reset, Dynamo's per-code
    # recompile limit (8) is reached across tests, not within one.
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
