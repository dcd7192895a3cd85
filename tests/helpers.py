"""Helpers the tests share: build a tiny model, its inputs and outputs, non-zero blocks, reference
runs of a mixed batch, tied-embedding pairs, op cases, and a compile that runs the pass alone.
Fixtures and pytest hooks stay in conftest.py; tests import these from here, never from conftest or
from another test module."""

from __future__ import annotations

import copy

import peft
import torch
from cases import TIED, TIED_VARIANTS
from small_models import DECODER, MODELS, VOCAB
from torch import nn

from miss_compile import MissConfig, adapters_disabled, apply_miss, ops, set_active_adapters
from miss_compile.explain import pass_only_backend
from miss_compile.peft_compat import named_miss_layers

__all__ = [
    "DECODER", "LINEARS", "VOCAB", "build", "call", "clone", "compile_pass_only", "copy_blocks", "count",
    "embedding_weight", "head", "input_ids", "is_causal_lm", "make_case", "mixed", "model_output",
    "randomize_blocks", "rows_alone", "run_op", "tied_pair",
]

LINEARS = (torch.nn.functional.linear, torch._C._nn.linear)


def build(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().to(dtype).eval()


def input_ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=generator)


def model_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False) if is_causal_lm(model) else model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@torch.no_grad()
def rows_alone(model, inputs, names, run=model_output):
    """Each row run alone with its own adapter (None: adapters off): what the mixed batch must equal.
    `run(model, rows)`: the output (default: model_output, for input ids)."""
    outputs = []
    for row, name in enumerate(names):
        if name is None:
            with adapters_disabled(model):
                outputs.append(run(model, inputs[row:row + 1]))
        else:
            set_active_adapters(model, name)
            outputs.append(run(model, inputs[row:row + 1]))
    return torch.cat(outputs)


def call(model, inputs):
    """A model's output for one positional input (rows_alone's `run` for modules that take x)."""
    return model(inputs)


def mixed(model, ids, **selection):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **selection).logits


def is_causal_lm(model: nn.Module) -> bool:
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


# --- tied lm_head and input embedding (cases.TIED)


def tied_pair(model_name, variant="balance", dtype=torch.float32):
    """(base, ours) with non-zero blocks; the base's head and embedding are one Parameter."""
    builder, embedding, targets = TIED[model_name]
    torch.manual_seed(0)
    base = builder().to(dtype).eval()
    assert base.get_output_embeddings().weight is base.get_submodule(embedding).weight
    ours = apply_miss(copy.deepcopy(base), MissConfig(target_modules=targets, **TIED_VARIANTS[variant]))
    randomize_blocks(ours)
    return base, ours


def embedding_weight(model, model_name):
    root = model.base_model.model if isinstance(model, peft.PeftModel) else model
    return root.get_submodule(TIED[model_name][1]).weight


def head(model):
    return named_miss_layers(model)["lm_head"]


# --- the ops on one case of cases.LINEAR_CASES / cases.BAT_CASES


def make_case(case, dtype=torch.float32, block_dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    in_features, out_features, shapes, variants, lead, with_bias = case
    x = torch.randn(*lead, in_features).to(dtype).requires_grad_()
    weight = torch.randn(out_features, in_features).to(dtype)
    bias = torch.randn(out_features).to(dtype) if with_bias else None
    blocks = [(torch.randn(shape) * 0.1).to(block_dtype).requires_grad_() for shape in shapes]
    return x, weight, bias, blocks, variants


def run_op(x, weight, bias, blocks, variants):
    if variants[0] == "bat":
        return ops.bat_linear(x, weight, bias, blocks)
    adapter_inputs = [x.to(block.dtype) for block in blocks]
    return ops.miss_linear(x, adapter_inputs, weight, bias, blocks)


# --- the FX pass alone (no Inductor)


def compile_pass_only(model, dynamic=False, fullgraph=True):
    reports, graphs = [], []
    inner = pass_only_backend(reports)

    def backend(gm, example_inputs):
        compiled = inner(gm, example_inputs)
        graphs.append(gm.graph)
        return compiled

    return torch.compile(model, backend=backend, fullgraph=fullgraph, dynamic=dynamic), reports, graphs


def count(graph, targets):
    return sum(1 for node in graph.nodes if node.op == "call_function" and node.target in targets)
