"""miss_backend end to end through Inductor: numbers against PEFT, generated code, recompiles.

Inductor compiles are the slow part of the suite: tiny models, one compile per test.
"""

import ast
import re
import shutil
from pathlib import Path

import peft
import pytest
import torch
from cases import CONFIGS
from helpers import build, clone, copy_blocks, input_ids, model_output, randomize_blocks
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache, run_and_get_code
from torch.testing import FileCheck

from miss_compile import (
    MissConfig,
    adapters_disabled,
    apply_miss,
    load_adapter,
    make_backend,
    save_adapter,
    set_active_adapters,
)
from miss_compile import backend as backend_module
from miss_compile.backend import MissGraphPass, source_files
from miss_compile.peft_compat import named_miss_layers

pytestmark = pytest.mark.slow

def peft_pair(model_name, variant, dtype=torch.float32):
    base = build(model_name, dtype)
    ours = apply_miss(clone(base), CONFIGS[variant])
    randomize_blocks(ours)
    theirs = peft.get_peft_model(clone(base), CONFIGS[variant].to_peft()).eval()
    copy_blocks(ours, theirs)
    return base, ours, theirs


def block_grads(model):
    return {name: layer.miss_block["default"].grad for name, layer in named_miss_layers(model).items()}


def _training_cases():
    # Every variant on Llama through PEFT's layers, ours once; the other architectures once each (the
    # pass's matching on every architecture x variant is in test_passes, without Inductor).
    for variant in CONFIGS:
        yield "llama", "peft", variant
    yield "llama", "ours", "balance"  # our layers call the ops directly: one variant through Inductor here
    yield "qwen2", "peft", "balance"
    yield "mistral", "peft", "mini"
    yield "bert", "peft", "bat"
    yield "gpt2", "ours", "balance"  # PEFT's MiSS does not adapt GPT-2's Conv1D (bat on it: test_models)


@pytest.mark.parametrize("model_name,which,variant", list(_training_cases()))
def test_training_step_matches_eager(model_name, which, variant):
    """Outputs, block gradients and input gradients of a compiled step equal eager PEFT (or, for
    GPT-2, our eager layers, which test_models checks against the reference)."""
    base = build(model_name)
    ours = apply_miss(clone(base), CONFIGS[variant])
    randomize_blocks(ours)
    if model_name == "gpt2":
        model, eager = ours, clone(ours)
    else:
        theirs = peft.get_peft_model(clone(base), CONFIGS[variant].to_peft()).eval()
        copy_blocks(ours, theirs)
        model, eager = (theirs if which == "peft" else ours), clone(theirs)
    backend = make_backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    embeddings = [m.get_input_embeddings() for m in (model, eager)]
    for embedding in embeddings:  # so that gradients flow back to the input (x) too
        embedding.weight.requires_grad_(True)
    ids = input_ids()
    loss = model_output(compiled, ids).square().mean()
    expected = model_output(eager, ids).square().mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    loss.backward()
    expected.backward()
    got, want = block_grads(model), block_grads(eager)
    for name in want:
        if want[name] is None:  # BERT's pooler is not in the loss: eager leaves None, compiled zeros
            assert got[name] is None or not got[name].any()
            continue
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeddings[0].weight.grad, embeddings[1].weight.grad, atol=1e-5, rtol=1e-5)
    (report,) = backend.graph_pass.reports
    assert len(report.rewritten) == len(named_miss_layers(model)) and not report.skipped


@pytest.mark.parametrize("variant", ["balance", "bat"])
def test_bf16_model_fp32_adapters(variant):
    _, _, theirs = peft_pair("llama", variant, torch.bfloat16)
    ids = input_ids()
    expected = model_output(theirs, ids)
    with torch.no_grad():
        out = model_output(torch.compile(theirs, backend=make_backend(), fullgraph=True), ids)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)


# --- generated code on one Linear


class OneLinear(nn.Module):
    def __init__(self, in_features=13, out_features=12):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.proj(x)


def one_linear(variant="balance", r=4):
    torch.manual_seed(0)
    model = apply_miss(OneLinear(), MissConfig(r=r, variant=variant, init="random", target_modules=["proj"]))
    return model.eval()


def test_adapter_product_feeds_the_base_gemm():
    model = one_linear()
    x = torch.randn(2, 3, 13)
    with torch.no_grad():
        out, (code, *_) = run_and_get_code(torch.compile(model, backend=make_backend()), x)
        expected = model(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # one fused chunk-sum kernel (pad + reduction), the small r x out GEMM, then addmm with it as input
    call = code.split("def call")[1]
    FileCheck().check("cpp_fused").check_count("extern_kernels.mm(", 1, exactly=True).check(
        "extern_kernels.addmm(").run(call)
    assert call.count("extern_kernels.") == 2
    assert "torch.ops.miss" not in code  # decomposed: no fallback call of the op


def test_many_tokens_fold_the_adapter_into_the_base_gemms_forward_and_backward():
    """tokens * r >= 4 * in: x @ (W + dW).T forward, grad @ (W + dW) backward, and the one GEMM
    left for the adapter is the block's gradient S(x).T @ grad."""
    model = one_linear(r=4)  # in 13, out 12; 64 tokens * 4 >= 4 * 13
    eager = clone(model)
    x = torch.randn(4, 16, 13, requires_grad=True)
    x_eager = x.detach().clone().requires_grad_(True)
    compiled = torch.compile(model, backend=make_backend())
    _, (forward_code, backward_code) = run_and_get_code(lambda: compiled(x).square().sum().backward())
    eager(x_eager).square().sum().backward()
    torch.testing.assert_close(x.grad, x_eager.grad, atol=1e-5, rtol=1e-5)
    block_grad, expected = model.proj.miss_block["default"].grad, eager.proj.miss_block["default"].grad
    torch.testing.assert_close(block_grad, expected, atol=1e-5, rtol=1e-5)
    forward_call, backward_call = forward_code.split("def call")[1], backward_code.split("def call")[1]
    assert forward_call.count("extern_kernels.") == 1 and "extern_kernels.addmm(" in forward_call
    assert backward_call.count("extern_kernels.mm(") == 2 and backward_call.count("extern_kernels.") == 2


def _saved_for_backward(model, backend, x):
    compiled = torch.compile(model, backend=backend)
    _, (forward_code, _) = run_and_get_code(lambda: compiled(x).square().sum().backward())
    returned = next(line for line in forward_code.split("def call")[1].splitlines() if line.strip().startswith("return ("))
    return [ast.unparse(item) for item in ast.parse(returned.strip()).body[0].value.elts[1:]]  # [0]: the output


def test_training_with_folding_saves_no_more_than_stock_inductor():
    """The folded W + dW is rebuilt in backward, not kept alive: PEFT's layer under miss_backend
    saves what stock Inductor saves on the same model: the parameters and S(x), nothing as big as W."""
    torch.manual_seed(0)
    base = OneLinear(16, 12)
    model = peft.get_peft_model(base, MissConfig(r=4, target_modules=["proj"]).to_peft())
    x = torch.randn(4, 16, 16, requires_grad=True)  # backward needs W + dW for x's gradient
    ours, stock = _saved_for_backward(model, make_backend(), x), _saved_for_backward(model, "inductor", x)
    computed = [[item for item in saved if not item.startswith("primals_")] for saved in (ours, stock)]
    assert len(computed[0]) == len(computed[1]) == 1, (ours, stock)  # S(x) only; W and D are parameters


def _kernel_calls(model, x):
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):  # parameters traced as constants
        out, (code, *_) = run_and_get_code(torch.compile(model, backend=make_backend(merge=True)), x)
    call = code.split("def call")[1]
    return out, re.findall(r"(extern_kernels\.\w+|torch\.ops\.[\w.]+|cpp_fused_\w+)\(", call)


def test_merge_folds_frozen_adapters_into_the_weight():
    model = one_linear()
    model.proj.miss_block["default"].requires_grad_(False)
    x = torch.randn(2, 3, 13)
    with torch.no_grad():
        expected = model(x)
    out, kernels = _kernel_calls(model, x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # the base model's cost: the same kernels as the plain Linear (W + dW folded at compile time,
    # no chunk sum, no adapter GEMM, no fold per call)
    torch._dynamo.reset()
    _, base_kernels = _kernel_calls(OneLinear(), x)
    assert kernels == base_kernels and len(base_kernels) <= 2, (kernels, base_kernels)


def test_merge_without_freezing_at_trace_time_warns_with_the_fix(caplog):
    model = one_linear().requires_grad_(False)
    x = torch.randn(2, 13)
    with torch.no_grad(), caplog.at_level("WARNING", logger="miss_compile.backend"):
        out = torch.compile(model, backend=make_backend(merge=True))(x)
        torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)  # right numbers, just slower
    assert "recomputed on every call" in caplog.text and "freezing=True" in caplog.text


def test_merge_keeps_trainable_adapters_unmerged():
    model = one_linear()
    backend = make_backend(merge=True)
    torch.compile(model, backend=backend)(torch.randn(2, 13)).sum().backward()
    assert not backend.graph_pass.reports[0].rewritten[0].merged
    assert model.proj.miss_block["default"].grad is not None


# --- dynamic shapes, in-place loads, switching


def test_dynamic_lengths_do_not_recompile():
    _, ours, _ = peft_pair("llama", "balance")
    backend = make_backend()
    compiled = torch.compile(ours, backend=backend, fullgraph=True, dynamic=True)
    compiles = []
    with torch.no_grad():
        for batch, seq in [(2, 5), (3, 11), (2, 23)]:
            ids = input_ids(batch, seq)
            torch.testing.assert_close(model_output(compiled, ids), model_output(ours, ids), atol=1e-5, rtol=1e-5)
            compiles.append(len(backend.graph_pass.reports))
    assert compiles[0] >= 1 and compiles[1:] == compiles[:1] * 2  # new lengths: no new graph


def test_in_place_load_takes_effect_without_recompile(tmp_path):
    base, ours, _ = peft_pair("llama", "balance")
    other = apply_miss(clone(base), CONFIGS["balance"])
    randomize_blocks(other, seed=11)
    save_adapter(other, tmp_path)
    backend = make_backend()
    compiled = torch.compile(ours, backend=backend, fullgraph=True)
    ids = input_ids()
    with torch.no_grad():
        before = model_output(compiled, ids)
        load_adapter(ours, tmp_path)  # same shapes, copied into the existing parameters
        after = model_output(compiled, ids)
    torch.testing.assert_close(after, model_output(other, ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after, atol=1e-3)
    assert len(backend.graph_pass.reports) == 1


def test_switching_and_disabling_never_stale():
    base, ours, _ = peft_pair("llama", "balance")
    apply_miss(ours, CONFIGS["bat"], "second")
    randomize_blocks(ours, "second", seed=5)
    compiled = torch.compile(ours, backend=make_backend(), fullgraph=True)
    ids = input_ids()
    with torch.no_grad():
        first = model_output(compiled, ids)
        torch.testing.assert_close(first, model_output(ours, ids), atol=1e-5, rtol=1e-5)
        set_active_adapters(ours, "second")
        second = model_output(compiled, ids)
        torch.testing.assert_close(second, model_output(ours, ids), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(first, second, atol=1e-3)
        with adapters_disabled(ours):
            torch.testing.assert_close(model_output(compiled, ids), model_output(base, ids), atol=1e-5, rtol=1e-5)


def test_twenty_training_steps_follow_eager():
    _, ours, _ = peft_pair("llama", "balance")
    eager = clone(ours)
    compiled = torch.compile(ours, backend=make_backend(), fullgraph=True)
    losses = []
    for model, runner in ((eager, eager), (ours, compiled)):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        curve = []
        for step in range(20):
            ids = input_ids(2, 8, seed=100 + step % 2)  # two batches, seen ten times each
            loss = runner(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            curve.append(loss.item())
        losses.append(curve)
    assert losses[0][-1] < losses[0][0]  # it learns
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), atol=1e-4, rtol=1e-4)


def test_backend_by_name_through_the_entry_point():
    model = one_linear()
    x = torch.randn(3, 13)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="miss")(x), model(x), atol=1e-5, rtol=1e-5)


# --- cache keys: the pass's uuid covers every module it runs, and it runs once


def _package_copy(tmp_path, name, edit=None):
    copy = tmp_path / name
    shutil.copytree(Path(source_files()[0]).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    if edit is not None:
        edit(copy)
    return copy


def test_pass_uuid_hashes_every_module_of_the_package(tmp_path, monkeypatch):
    """reference.py (which the pass and ops call), config.py, ... and modules split off later."""
    assert {"passes.py", "ops.py", "lowering.py", "reference.py", "config.py", "peft_compat.py"} <= {
        Path(path).name for path in source_files()}
    assert MissGraphPass(merge=True).uuid() != MissGraphPass().uuid()
    copies = {  # copies, not the package itself: its digest is read once per process, and files change
        "same": _package_copy(tmp_path, "same"),
        "same again": _package_copy(tmp_path, "again"),
        "reference edited": _package_copy(
            tmp_path, "edited", lambda d: (d / "reference.py").write_text((d / "reference.py").read_text() + "\n# x\n")),
        "a module split off": _package_copy(
            tmp_path, "split", lambda d: (d / "pass_matchers.py").write_text("MATCHERS = ()\n")),
    }
    uuids = {}
    for what, copy in copies.items():
        monkeypatch.setattr(backend_module, "source_files", lambda copy=copy: source_files(copy))
        uuids[what] = MissGraphPass().uuid()
    assert uuids["same"] == uuids["same again"]  # contents, not paths
    assert uuids["reference edited"] != uuids["same"] and uuids["a module split off"] != uuids["same"]


def _cache_hits():
    return counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]


def test_warm_cache_serves_only_graphs_built_from_the_same_sources(tmp_path, monkeypatch):
    model, x = one_linear(), torch.randn(2, 13)
    edited = _package_copy(tmp_path, "edited", lambda d: (d / "reference.py").write_text("# changed math\n"))
    rewrites = []
    real_rewrite = backend_module.rewrite_miss_linears
    monkeypatch.setattr(backend_module, "rewrite_miss_linears",
                        lambda graph, merge: rewrites.append(graph) or real_rewrite(graph, merge=merge))
    hits = []
    with fresh_cache(), torch.no_grad():
        for sources in (None, None, edited):  # cold, warm, warm but other sources
            if sources is not None:
                monkeypatch.setattr(backend_module, "source_files", lambda sources=sources: source_files(sources))
            torch._dynamo.reset()
            counters.clear()
            torch.testing.assert_close(torch.compile(model, backend=make_backend())(x), model(x), atol=1e-5, rtol=1e-5)
            hits.append(_cache_hits())
    assert hits[0] == 0 and hits[1] > 0 and hits[2] == 0, hits
    assert len(rewrites) == 3  # the pass ran once per compile (Inductor's pre-grad slot only keys the caches)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_with_two_layers_reading_one_x(dtype):
    """A PEFT model cast whole to bf16/fp16 (blocks too), q_proj and v_proj adapted: both chunk sums read
    one x. Inductor's CPU codegen declared one accumulator twice for two such half-precision sums (a
    C++ compile error); the chunk sum accumulates in fp32 explicitly (one rounding, as torch's own sum)."""
    base = build("llama")
    theirs = peft.get_peft_model(base, peft.MissConfig(r=4, init_weights=False, target_modules=["q_proj", "v_proj"]))
    theirs = theirs.to(dtype).eval()
    ids = input_ids()
    with torch.no_grad():
        expected = model_output(theirs, ids)
        backend = make_backend()
        got = model_output(torch.compile(clone(theirs), backend=backend), ids)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    assert sum(len(report.rewritten) for report in backend.graph_pass.reports) == 4
