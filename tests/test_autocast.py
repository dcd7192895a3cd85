"""torch.autocast: the ops, and models compiled by miss_backend, compute what eager PEFT computes
under autocast: base GEMM and S(x) @ D in the autocast dtype, chunk sums in the adapter's dtype,
the result in x's dtype. CPU bf16 here; the rules are the same for CUDA fp16/bf16."""

import re

import peft
import pytest
import torch
import transformers
from cases import BAT_CASES, CONFIGS, LINEAR_CASES
from helpers import DECODER, clone, copy_blocks, input_ids, make_case, model_output, randomize_blocks, run_op
from torch._inductor.utils import run_and_get_code

from miss_compile import MissConfig, apply_miss, make_backend, reference
from miss_compile.ops import stacked_linear
from miss_compile.peft_compat import named_miss_layers

AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)
TOLERANCE = dict(atol=2e-2, rtol=2e-2)


def assert_close_to_scale(got, want):
    """bf16 gradients summed over many products: 2e-2 of the largest entry (both sides round as much)."""
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=2e-2 * float(want.abs().max().clamp(min=1)), rtol=2e-2)


# --- the ops in eager mode against the reference's eager code (PEFT's dtype rules)


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16], ids=["fp32-model", "bf16-model"])
@pytest.mark.parametrize("name", list(LINEAR_CASES) + list(BAT_CASES))
def test_op_under_autocast_matches_eager_reference(name, model_dtype):
    x, weight, bias, blocks, variants = make_case({**LINEAR_CASES, **BAT_CASES}[name], dtype=model_dtype)
    terms = list(zip(blocks, variants, strict=True))
    with torch.autocast(**AUTOCAST):
        out = run_op(x, weight, bias, blocks, variants)
        expected = reference.forward(x, weight, bias, terms)
    assert out.dtype == expected.dtype == model_dtype
    # balance/mini round exactly as PEFT does; bat rounds W and D to bf16 before folding
    tight = dict(atol=1e-6, rtol=1e-6) if variants[0] != "bat" else TOLERANCE
    torch.testing.assert_close(out, expected, **tight)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *blocks], grad)
    want = torch.autograd.grad(expected, [x, *blocks], grad)
    for g, w in zip(got, want, strict=True):
        assert_close_to_scale(g, w)


def test_op_outside_autocast_is_unchanged():
    """The autocast rule applies only inside autocast: fp32 stays fp32 to the last bit."""
    x, weight, bias, blocks, variants = make_case(LINEAR_CASES["two-adapters"])
    out = run_op(x, weight, bias, blocks, variants)
    expected = reference.forward(x, weight, bias, list(zip(blocks, variants, strict=True)))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    with torch.autocast(**AUTOCAST):
        assert (run_op(x, weight, bias, blocks, variants) - out).abs().max() > 1e-4  # bf16 rounding shows


def test_stacked_op_under_autocast_rounds_like_a_bf16_linear():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 4, 13), torch.randn(6, 13), torch.randn(6)
    stack, ids = torch.randn(3, 4, 6) * 0.1, torch.tensor([1, -1, 0])
    with torch.autocast(**AUTOCAST):
        out = stacked_linear(x, ids, weight, bias, stack)
    x16, weight16, bias16, stack16 = (t.bfloat16() for t in (x, weight, bias, stack))
    sums = reference.chunk_sum(x16, 4)
    expected = torch.nn.functional.linear(x16, weight16, bias16) + torch.einsum("btr,bro->bto", sums, stack16[ids])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected.float(), **TOLERANCE)


# --- compiled: the generated GEMMs run in bf16, the numbers follow eager


def _gemm_out_dtypes(code):
    """dtype of the buffer every extern GEMM of the forward call writes."""
    call = code.split("def call")[1].split("runner = Runner")[0]
    allocated = dict(re.findall(r"(buf\d+) = empty_strided_cpu\([^\n]*?(torch\.\w+)\)", call))
    outs = re.findall(r"extern_kernels\.(?:mm|addmm|bmm)\([^\n]*out=(buf\d+)\)", call)
    return [allocated.get(buf) for buf in outs]


class Proj(torch.nn.Module):
    def __init__(self, in_features=16, out_features=12):
        super().__init__()
        self.proj = torch.nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("variant", ["balance", "mini", "bat"])
def test_compiled_layer_computes_in_the_autocast_dtype(variant):
    torch.manual_seed(0)
    config = MissConfig(r=4, variant=variant, mini_r=6, init="random", target_modules=["proj"])
    model = apply_miss(Proj(), config).eval()
    x = torch.randn(2, 3, 16)
    with torch.no_grad(), torch.autocast(**AUTOCAST):
        expected = model(x)
        out, (code, *_) = run_and_get_code(torch.compile(model, backend=make_backend()), x)
    assert out.dtype == expected.dtype == torch.float32  # PEFT casts the result back to x's dtype
    torch.testing.assert_close(out, expected, **TOLERANCE)
    dtypes = _gemm_out_dtypes(code)
    if variant == "bat":  # the r x r fold GEMMs stay fp32 (the op folds in fp32); the linear is bf16
        dtypes = dtypes[-1:]
    assert dtypes and set(dtypes) == {"torch.bfloat16"}, dtypes


def test_compiled_stacked_op_computes_in_the_autocast_dtype():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 4, 13), torch.randn(6, 13), torch.randn(6)
    stack, ids = torch.randn(3, 4, 6) * 0.1, torch.tensor([1, -1, 0])
    with torch.no_grad(), torch.autocast(**AUTOCAST):
        expected = stacked_linear(x, ids, weight, bias, stack)
        compiled = torch.compile(lambda *args: stacked_linear(*args), backend=make_backend())
        out, (code, *_) = run_and_get_code(compiled, x, ids, weight, bias, stack)
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, **TOLERANCE)
    dtypes = _gemm_out_dtypes(code)
    assert dtypes and set(dtypes) == {"torch.bfloat16"}, dtypes


# --- compiled models: a training step under autocast, eager against compiled


def _adapted(which, variant):
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**DECODER, "num_hidden_layers": 1})).eval()
    ours = apply_miss(clone(base), CONFIGS[variant])
    randomize_blocks(ours)
    if which == "ours":
        return ours
    theirs = peft.get_peft_model(clone(base), CONFIGS[variant].to_peft()).eval()
    copy_blocks(ours, theirs)
    return theirs


def _autocast_step(model, runner, ids, autocast=AUTOCAST):
    with torch.autocast(**autocast):
        logits = model_output(runner, ids)
    logits.float().square().mean().backward()
    grads = {name: layer.miss_block["default"].grad for name, layer in named_miss_layers(model).items()}
    return logits, grads


@pytest.mark.slow
@pytest.mark.parametrize("which", ["peft", "ours"])
@pytest.mark.parametrize("variant", list(CONFIGS))
def test_training_step_under_autocast_matches_eager(which, variant):
    model = _adapted(which, variant)
    eager = clone(model)
    backend = make_backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    ids = input_ids()
    logits, grads = _autocast_step(model, compiled, ids)
    expected, expected_grads = _autocast_step(eager, eager, ids)
    assert logits.dtype == expected.dtype
    torch.testing.assert_close(logits, expected, **TOLERANCE)
    for name, want in expected_grads.items():
        assert grads[name].dtype == want.dtype == torch.float32
        assert_close_to_scale(grads[name], want)
    (report,) = backend.graph_pass.reports
    assert len(report.rewritten) == len(named_miss_layers(model)) and not report.skipped


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ["balance", "bat"])
def test_cuda_training_step_under_autocast_matches_eager(variant, dtype):
    """The same rules on CUDA (AutocastCUDA), fp16 and bf16: PEFT eager against compiled."""
    model = _adapted("peft", variant).cuda()
    eager = clone(model)
    compiled = torch.compile(model, backend=make_backend(), fullgraph=True)
    ids, autocast = input_ids().cuda(), dict(device_type="cuda", dtype=dtype)
    logits, grads = _autocast_step(model, compiled, ids, autocast)
    expected, expected_grads = _autocast_step(eager, eager, ids, autocast)
    assert logits.dtype == expected.dtype
    torch.testing.assert_close(logits, expected, **TOLERANCE)
    for name, want in expected_grads.items():
        assert_close_to_scale(grads[name], want)


def test_merged_layer_under_autocast_returns_x_dtype():
    torch.manual_seed(0)
    model = apply_miss(Proj(), MissConfig(r=4, init="random", target_modules=["proj"])).eval().requires_grad_(False)
    x = torch.randn(2, 3, 16)
    with torch.no_grad(), torch.autocast(**AUTOCAST), torch._inductor.config.patch(freezing=True):
        expected = model(x)
        out = torch.compile(model, backend=make_backend(merge=True))(x)
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, **TOLERANCE)
