"""The contenders' models: a base model, PEFT MiSS on it, PEFT LoRA with the same trainable parameters.

transformers and PEFT are imported where used: the compile-time children of --quick need neither.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from miss_compile import MissConfig
from miss_compile.peft_compat import named_miss_layers

# The dtype settings of the layer table: model dtype, and whether PEFT keeps adapters in fp32
# (its default, autocast_adapter_dtype=True) or in the model's dtype.
DTYPES = {
    "fp32": (torch.float32, False),
    "bf16": (torch.bfloat16, False),
    "bf16 + fp32 adapters": (torch.bfloat16, True),
}


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int = 1024
    heads: int | None = None  # default hidden // 64
    kv_heads: int | None = None  # default: as many as heads

    def build(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
        import transformers

        torch.manual_seed(seed)
        config = transformers.LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads or max(1, self.hidden // 64),
            num_key_value_heads=self.kv_heads or self.heads or max(1, self.hidden // 64),
            max_position_embeddings=4096, use_cache=False,
        )
        return transformers.LlamaForCausalLM(config).to(dtype)


class OneLinear(nn.Module):
    """A bias-free square Linear, as in Llama's attention projections."""

    def __init__(self, features: int, dtype: torch.dtype):
        super().__init__()
        self.proj = nn.Linear(features, features, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def projections(shape: LlamaShape) -> list[tuple[int, int]]:
    """(in, out) of one layer's seven projections, in SEVEN_PROJECTIONS' order."""
    hidden, inter = shape.hidden, shape.intermediate
    heads = shape.heads or max(1, hidden // 64)
    kv = hidden // heads * (shape.kv_heads or heads)
    return [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter),
            (inter, hidden)]


def miss_config(variant: str, r: int, targets: list[str]) -> MissConfig:
    mini_r = r if variant == "mini" else 1
    return MissConfig(r=r, variant=variant, mini_r=mini_r, target_modules=targets)


def peft_miss(base: nn.Module, variant: str, r: int, targets: list[str], fp32_adapters: bool = True) -> nn.Module:
    """PEFT's MiSS on a copy of `base`, with small random blocks (zeros would hide nothing in timing,
    but parity checks against zero blocks would be trivial)."""
    import peft

    model = peft.get_peft_model(copy.deepcopy(base), miss_config(variant, r, targets).to_peft(),
                                autocast_adapter_dtype=fp32_adapters)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in named_miss_layers(model).values():
            block = layer.miss_block["default"]
            block.copy_(torch.randn(block.shape, generator=generator) * 0.02)
    return model


def peft_lora(base: nn.Module, r: int, targets: list[str], fp32_adapters: bool = True) -> nn.Module:
    """PEFT LoRA; B is made non-zero so that its branch computes like a trained adapter's."""
    import peft

    config = peft.LoraConfig(r=r, lora_alpha=r, target_modules=targets, lora_dropout=0.0)
    model = peft.get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=fp32_adapters)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
