"""The FX pass alone (no Inductor): what it rewrites, what it leaves, and that the numbers stay."""

import cases
import peft
import pytest
import torch
from helpers import (
    LINEARS,
    build,
    clone,
    compile_pass_only,
    copy_blocks,
    count,
    input_ids,
    model_output,
    randomize_blocks,
)
from torch import nn

from miss_compile import MissConfig, apply_miss, explain, make_backend, passes
from miss_compile.explain import pass_only_backend
from miss_compile.passes import MISS_OPS, rewrite_miss_linears
from miss_compile.peft_compat import named_miss_layers

CONFIGS = {**cases.CONFIGS, "balance": MissConfig(**cases.VARIANTS["balance"], dropout=0.1)}  # a dropout in the pattern


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
@pytest.mark.parametrize("model_name", cases.MODEL_NAMES)
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


# --- activation checkpointing: the pass rewrites inside higher-order ops' bodies


def peft_llama_checkpointed(variant):
    """A PEFT Llama in training with gradient checkpointing (transformers): Dynamo puts each decoder
    layer in a tag_activation_checkpoint body."""
    _, _, theirs = adapted_pair("llama", variant)
    for module in theirs.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # same masks in both runs
    theirs.train()
    # transformers >= 5.25 names it activation_checkpointing_enable (the old name warns).
    getattr(theirs, "activation_checkpointing_enable", theirs.gradient_checkpointing_enable)()
    return theirs


# transformers >= 5.25 sets Python state in every checkpointed attention forward; without this Dynamo
# runs those layers eagerly (the backend warns: test_compile_ux), with it it traces them.
traced_checkpoints = torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)


def assert_same_gradients(model, reference_model, tolerance=1e-5):
    for (name, param), (_, expected) in zip(model.named_parameters(), reference_model.named_parameters(), strict=True):
        assert (param.grad is None) == (expected.grad is None), name
        if param.grad is not None:
            torch.testing.assert_close(param.grad, expected.grad, atol=tolerance, rtol=tolerance, msg=name)


def assert_step_like_eager(compiled, model, reference_model):
    """One training step: the compiled model's loss and gradients equal the eager copy's."""
    ids = input_ids()
    loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
    expected = reference_model(input_ids=ids, labels=ids, use_cache=False).loss
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    loss.backward()
    expected.backward()
    assert_same_gradients(model, reference_model)


@pytest.mark.parametrize("variant", ["balance", "bat"])
@traced_checkpoints
def test_gradient_checkpointing_is_rewritten_and_trains_like_eager(variant):
    theirs = peft_llama_checkpointed(variant)
    reference_model = clone(theirs)
    compiled, reports, graphs = compile_pass_only(theirs, fullgraph=False)
    assert_step_like_eager(compiled, theirs, reference_model)
    rewritten = [item for report in reports for item in report.rewritten]
    assert len(rewritten) == len(named_miss_layers(theirs)) == 14
    assert not any(report.skipped for report in reports)
    bodies = [gm for graph in graphs for name, gm in graph.owning_module.named_children() if name.startswith("wrap_body")]
    assert len(bodies) == 2 and all(count(body.graph, MISS_OPS) == 7 for body in bodies)
    report = explain(theirs, input_ids=input_ids(), use_cache=False)
    assert str(report).startswith("miss_backend: 14 MiSS Linear(s) as miss ops, 0 left as they were")


class Checkpointed(nn.Module):
    def __init__(self, use_reentrant):
        super().__init__()
        self.use_reentrant = use_reentrant
        self.proj = nn.Linear(12, 8)
        self.block = nn.Parameter(torch.randn(4, 8) * 0.1)

    def adapted(self, x):
        return self.proj(x) + x.reshape(*x.shape[:-1], 3, 4).sum(-2) @ self.block

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.adapted, x, use_reentrant=self.use_reentrant).tanh()


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_torch_checkpoint_regions_are_rewritten(use_reentrant, merge):
    torch.manual_seed(0)
    model = Checkpointed(use_reentrant)
    if merge:
        model.block.requires_grad_(False)
    reference_model = clone(model)
    x = torch.randn(2, 3, 12, requires_grad=True)
    x_reference = x.detach().clone().requires_grad_(True)
    reports = []
    compiled = torch.compile(model, backend=pass_only_backend(reports, merge=merge), fullgraph=True, dynamic=False)
    got, expected = compiled(x), reference_model(x_reference)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    got.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x.grad, x_reference.grad, atol=1e-6, rtol=1e-6)
    if not merge:
        assert_same_gradients(model, reference_model, 1e-6)
    (report,) = reports
    assert [(item.layer, item.merged) for item in report.rewritten] == [("proj", merge)] and not report.skipped


def test_frozen_tensors_a_checkpoint_body_reads_are_not_reported_as_regions():
    """Traced under freezing, parameters reach a checkpoint body as get_attr tensors: data, not bodies."""
    torch.manual_seed(0)
    model = Checkpointed(use_reentrant=False).requires_grad_(False)
    x = torch.randn(2, 3, 12)
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        report = explain(model, x, merge=True)
        torch.testing.assert_close(torch.compile(model, backend=make_backend(merge=True))(x), model(x))
    assert [(item.layer, item.merged) for item in report.rewritten] == [("proj", True)]
    assert not report.skipped, report.skipped


def test_unreadable_higher_order_body_is_reported():
    """A region the pass cannot enter is named in the report, never silently counted as nothing."""
    root = nn.Module()
    root.body = nn.Linear(2, 2)  # not a GraphModule: nothing to read
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    body = graph.get_attr("body")
    graph.output(graph.call_function(torch.ops.higher_order.tag_activation_checkpoint, (body, x)))
    torch.fx.GraphModule(root, graph)
    report = rewrite_miss_linears(graph)
    assert report.skipped == [("tag_activation_checkpoint", "tag_activation_checkpoint runs body, which the pass cannot read")]


class Adapted(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 8)
        self.block = nn.Parameter(torch.randn(4, 8) * 0.1)

    def forward(self, x):
        return self.proj(x) + x.reshape(*x.shape[:-1], 3, 4).sum(-2) @ self.block


@pytest.mark.parametrize("broken", ["_match_chunk_term", "_adapter_path", "_result", "check_no_writes"])
def test_internal_matcher_error_leaves_the_graph_as_it_was(broken, monkeypatch, caplog):
    """A bug anywhere in matching (here: late, after the whole branch was read) is reported, logged
    and leaves the graph exactly as it was; the compile goes on."""

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(passes, broken, fail)
    model = Adapted()
    x = torch.randn(2, 12)
    before, reports = [], []

    def backend(gm, example_inputs):
        before.append(str(gm.graph))
        reports.append(rewrite_miss_linears(gm.graph))
        assert str(gm.graph) == before[0]  # nothing inserted, nothing erased
        gm.recompile()
        return gm.forward

    with caplog.at_level("WARNING", logger="miss_compile.passes"):
        torch.testing.assert_close(torch.compile(model, backend=backend, fullgraph=True)(x), model(x))
    assert reports[0].skipped == [("proj", "internal matcher error: RuntimeError: boom")]
    assert "internal matcher error" in caplog.text


@pytest.mark.slow
@traced_checkpoints
def test_gradient_checkpointing_through_inductor_trains_like_eager():
    """The real backend: AOT autograd and Inductor take miss ops inside checkpointed bodies."""
    theirs = peft_llama_checkpointed("balance")
    reference_model = clone(theirs)
    backend = make_backend()
    compiled = torch.compile(theirs, backend=backend)
    assert_step_like_eager(compiled, theirs, reference_model)
    assert sum(len(report.rewritten) for report in backend.graph_pass.reports) == 14


@pytest.mark.parametrize("source", ["peft pattern", "miss op"])
def test_merged_layer_keeps_the_op_dtype_under_autocast(source):
    """Folded, the layer is F.linear(x, W + dW, b) cast back to what the op returns (x's dtype):
    under autocast F.linear alone would return bf16."""
    torch.manual_seed(0)
    config = MissConfig(r=4, init="random", target_modules=["0"])
    if source == "peft pattern":
        model = peft.get_peft_model(nn.Sequential(nn.Linear(12, 8)), config.to_peft())
    else:
        model = apply_miss(nn.Sequential(nn.Linear(12, 8)), config)
    model = model.eval().requires_grad_(False)
    x = torch.randn(2, 3, 12)
    reports = []
    compiled = torch.compile(model, backend=pass_only_backend(reports, merge=True), fullgraph=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = model(x), compiled(x)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    assert [item.merged for item in reports[0].rewritten] == [True]
