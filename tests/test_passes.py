"""The FX pass alone (no Inductor): what it rewrites, what it leaves, and that the numbers stay."""

import peft
import pytest
import torch
from conftest import build, clone, copy_blocks, input_ids, model_output, randomize_blocks
from torch import nn

from miss_compile import MissConfig, apply_miss, explain
from miss_compile.explain import pass_only_backend
from miss_compile.passes import MISS_OPS
from miss_compile.peft_compat import named_miss_layers

CONFIGS = {
    "balance": MissConfig(r=3, init="random", target_modules="all-linear", dropout=0.1),
    "mini": MissConfig(r=3, variant="mini", mini_r=8, target_modules="all-linear"),
    "bat": MissConfig(r=8, variant="bat", target_modules="all-linear"),
}


def compile_pass_only(model, dynamic=False):
    reports, graphs = [], []
    inner = pass_only_backend(reports)

    def backend(gm, example_inputs):
        compiled = inner(gm, example_inputs)
        graphs.append(gm.graph)
        return compiled

    return torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic), reports, graphs


def count(graph, targets):
    return sum(1 for node in graph.nodes if node.op == "call_function" and node.target in targets)


LINEARS = (torch.nn.functional.linear, torch._C._nn.linear)


def adapted_pair(model_name, variant, dtype=torch.float32):
    base = build(model_name, dtype)
    ours = apply_miss(clone(base), CONFIGS[variant])
    randomize_blocks(ours)
    if model_name == "gpt2":  # PEFT's MiSS does not adapt Conv1D
        return base, ours, None
    theirs = peft.get_peft_model(clone(base), CONFIGS[variant].to_peft()).eval()
    copy_blocks(ours, theirs)
    return base, ours, theirs


@pytest.mark.parametrize("variant", list(CONFIGS))
@pytest.mark.parametrize("model_name", ["llama", "qwen2", "mistral", "bert", "gpt2"])
def test_every_adapted_linear_becomes_one_op(model_name, variant):
    base, ours, theirs = adapted_pair(model_name, variant)
    ids = input_ids()
    expected = model_output(theirs if theirs is not None else ours, ids)
    for model in (ours, theirs) if theirs is not None else (ours,):
        n_layers = len(named_miss_layers(model))
        plain_linears = sum(isinstance(m, nn.Linear) for m in base.modules()) - (
            n_layers if model_name != "gpt2" else 0)
        compiled, reports, graphs = compile_pass_only(model)
        torch.testing.assert_close(model_output(compiled, ids), expected, atol=1e-5, rtol=1e-5)
        (graph,) = graphs
        assert count(graph, MISS_OPS) == n_layers
        assert count(graph, LINEARS) == plain_linears  # untouched: the output head, BERT's pooler if not adapted
        assert len(reports[0].rewritten) == n_layers and not reports[0].skipped


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_bf16_peft_pattern_with_fp32_adapters(variant):
    _, ours, theirs = adapted_pair("llama", variant, torch.bfloat16)
    compiled, reports, _ = compile_pass_only(theirs)
    ids = input_ids()
    torch.testing.assert_close(model_output(compiled, ids), model_output(theirs, ids), atol=2e-2, rtol=2e-2)
    assert len(reports[0].rewritten) == 14


def test_gradients_through_rewritten_graph_match_peft():
    _, _, theirs = adapted_pair("llama", "balance")
    reference_model = clone(theirs)
    compiled, _, _ = compile_pass_only(theirs)
    ids = input_ids()
    for model in (compiled, reference_model):
        model(input_ids=ids, labels=ids).loss.backward()
    for name, layer in named_miss_layers(theirs).items():
        torch.testing.assert_close(layer.miss_block["default"].grad,
                                   named_miss_layers(reference_model)[name].miss_block["default"].grad,
                                   atol=1e-5, rtol=1e-5)


def test_peft_two_adapters_and_disabled_adapters():
    base, _, theirs = adapted_pair("llama", "balance")
    peft_config = CONFIGS["balance"].to_peft()
    theirs.add_adapter("second", peft_config)
    for layer in named_miss_layers(theirs).values():
        torch.nn.init.normal_(layer.miss_block["second"], std=0.1)
    theirs.base_model.set_adapter(["default", "second"])
    theirs.eval()  # PEFT creates the new adapter's dropout in training mode
    ids = input_ids()
    compiled, reports, graphs = compile_pass_only(theirs)
    torch.testing.assert_close(model_output(compiled, ids), model_output(theirs, ids), atol=1e-5, rtol=1e-5)
    assert {item.adapters for item in reports[-1].rewritten} == {2}
    with theirs.disable_adapter():
        torch.testing.assert_close(model_output(compiled, ids), model_output(base, ids), atol=1e-5, rtol=1e-5)
    assert count(graphs[-1], MISS_OPS) == 0  # recompiled for the disabled state: plain Linears


def test_dynamic_shapes_compile_once():
    _, ours, theirs = adapted_pair("llama", "balance")
    compiled, reports, _ = compile_pass_only(theirs, dynamic=True)
    for batch, seq in [(2, 5), (3, 9), (4, 17)]:
        ids = input_ids(batch, seq)
        torch.testing.assert_close(model_output(compiled, ids), model_output(theirs, ids), atol=1e-5, rtol=1e-5)
    assert len(reports) == 1 and len(reports[0].rewritten) == 14
    # Size 1 is specialized by Dynamo (0/1 specialization): one more graph, then none.
    for batch, seq in [(1, 1), (1, 1)]:
        ids = input_ids(batch, seq)
        torch.testing.assert_close(model_output(compiled, ids), model_output(theirs, ids), atol=1e-5, rtol=1e-5)
    assert len(reports) <= 3


# --- look-alikes: reshape-sum-matmul code that is not a MiSS adapter stays as it is


class LookAlike(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(12, 8)
        self.block = nn.Parameter(torch.randn(4, 8))

    def forward(self, x, other):
        y = self.proj(x)
        if self.kind == "other input":
            return y + other.reshape(*other.shape[:-1], 3, 4).sum(-2) @ self.block
        if self.kind == "wrong dim":
            return y + x.reshape(*x.shape[:-1], 4, 3).sum(-1) @ self.block
        if self.kind == "computed block":
            return y + x.reshape(*x.shape[:-1], 3, 4).sum(-2) @ (self.block * 2)
        if self.kind == "branch used twice":
            term = x.reshape(*x.shape[:-1], 3, 4).sum(-2) @ self.block
            return y + term, term
        if self.kind == "nonlinear input":
            return y + torch.relu(x).reshape(*x.shape[:-1], 3, 4).sum(-2) @ self.block
        raise AssertionError(self.kind)


@pytest.mark.parametrize("kind", ["other input", "wrong dim", "computed block", "branch used twice", "nonlinear input"])
def test_look_alikes_are_left_alone_and_reported(kind):
    model = LookAlike(kind)
    x, other = torch.randn(2, 12), torch.randn(2, 12)
    compiled, reports, graphs = compile_pass_only(model)
    torch.testing.assert_close(compiled(x, other), model(x, other))
    assert count(graphs[0], MISS_OPS) == 0 and count(graphs[0], LINEARS) == 1
    assert reports[0].skipped and reports[0].skipped[0][0] == "proj"
    assert not reports[0].rewritten


def test_explain_names_rewritten_and_untouched_layers():
    _, _, theirs = adapted_pair("llama", "bat")
    report = explain(theirs, input_ids=input_ids(), use_cache=False)
    text = str(report)
    assert text.startswith("miss_backend: 14 MiSS Linear(s) as miss ops, 0 left as they were")
    assert "rewritten  base_model.model.model.layers.0.self_attn.q_proj: bat, 1 adapter(s), peft pattern" in text
    report = explain(LookAlike("other input"), torch.randn(2, 12), torch.randn(2, 12))
    assert "untouched  proj: the adapter branch reads" in str(report)
