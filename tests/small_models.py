"""The tiny models the tests adapt: transformers models built from configs (no hub), and modules of
one or two Linears (what the fuzz, bad-input and serving tests adapt)."""

import torch
import transformers
from torch import nn

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


def tiny_gpt2() -> nn.Module:  # GPT-2 ties lm_head to wte by default; its other layers are Conv1D
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config)


def tied_llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER, tie_word_embeddings=True))


MODELS = {
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "mistral": tiny_mistral,
    "bert": tiny_bert,
    "gpt2": tiny_gpt2,
}


class OneLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class TwoLinears(nn.Module):
    """x: [..., 12] -> [..., 8] through a hidden width of 16."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(12, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))
