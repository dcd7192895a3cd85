"""Differential fuzzing: random adapted Linears, every fast path against the reference math.

CI runs a fixed, derandomized set of examples (the "ci" hypothesis profile); a release check runs
them for a chosen time with fresh seeds and reports what it tried:

    .venv/bin/python -m pytest tests/test_fuzz.py --soak=600     # examples tried include shrinking steps

Eager layers (and PEFT where it computes the same thing) get many examples; Inductor compiles and
ONNX exports cost seconds each, so they get few, on a single adapted Linear.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import peft
import pytest
import torch
from helpers import clone
from hypothesis import strategies as st
from small_models import OneLinear
from torch import nn

from miss_compile import MissConfig, apply_miss, make_backend, merge_adapters, reference, unmerge_adapters
from miss_compile.export import export_onnx, load_session

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
ONNX_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2}  # export.validate's limits


# --- cases: a Linear with one to three adapters of any variant, any input shape


@dataclass(frozen=True)
class Adapter:
    variant: str
    r: int
    mini_r: int
    dropout: float


@dataclass(frozen=True)
class Case:
    in_features: int
    out_features: int
    bias: bool
    adapters: tuple[Adapter, ...]
    dtype: torch.dtype
    lead: tuple[int, ...]  # (tokens,) for a 2-D input, (batch, seq) for 3-D
    seed: int


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def _adapter(draw: st.DrawFn, in_features: int, out_features: int, variants: tuple[str, ...]) -> Adapter:
    variant = draw(st.sampled_from(variants))
    dropout = draw(st.sampled_from((0.0, 0.1, 0.5)))
    if variant == "bat":
        r = draw(st.sampled_from(_divisors(math.gcd(in_features, out_features))))
        return Adapter("bat", r, 1, 0.0)  # PEFT's bat has no dropout
    r = draw(st.integers(1, in_features))
    mini_r = draw(st.sampled_from(_divisors(out_features))) if variant == "mini" else 1
    return Adapter(variant, r, mini_r, dropout)


@st.composite
def cases(
    draw: st.DrawFn,
    max_features: int = 40,
    max_adapters: int = 3,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
    max_lead: int = 5,
) -> Case:
    in_features = draw(st.integers(1, max_features))
    out_features = draw(st.integers(1, max_features))
    n_adapters = draw(st.integers(1, max_adapters))
    variants = ("balance", "mini", "bat")
    adapters = tuple(draw(_adapter(in_features, out_features, variants)) for _ in range(n_adapters))
    lead = draw(st.one_of(
        st.tuples(st.integers(1, max_lead)),
        st.tuples(st.integers(1, 3), st.integers(1, max_lead)),
    ))
    return Case(in_features, out_features, draw(st.booleans()), adapters, draw(st.sampled_from(dtypes)), lead,
                draw(st.integers(0, 2**16)))


def _config(adapter: Adapter) -> MissConfig:
    return MissConfig(r=adapter.r, variant=adapter.variant, mini_r=adapter.mini_r, dropout=adapter.dropout,
                      target_modules=["proj"])


def adapted(case: Case) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(base, adapted model in eval mode with every adapter active and random blocks, input)."""
    torch.manual_seed(case.seed)
    base = OneLinear(case.in_features, case.out_features, case.bias).to(case.dtype).eval()
    model = clone(base)
    names = [f"a{i}" for i in range(len(case.adapters))]
    for name, adapter in zip(names, case.adapters, strict=True):
        apply_miss(model, _config(adapter), name)
    with torch.no_grad():
        for block in model.proj.miss_block.values():
            block.copy_(torch.randn(block.shape) * 0.1)
    model.proj.set_adapter(names)
    x = torch.randn(*case.lead, case.in_features).to(case.dtype)
    return base, model.eval(), x


def expected(model: nn.Module, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The reference forward of the model's active adapters (dropout is off in eval)."""
    layer = model.proj
    terms = [(layer.miss_block[name].detach(), layer.miss_variant[name]) for name in layer.active_adapters]
    weight = layer.base_weight().detach() if weight is None else weight
    bias = None if layer.base_layer.bias is None else layer.base_layer.bias.detach()
    return reference.forward(x, weight, bias, terms)


def assert_close(actual: torch.Tensor, wanted: torch.Tensor, dtype: torch.dtype, tolerance: dict = TOLERANCE) -> None:
    assert actual.dtype == wanted.dtype and actual.shape == wanted.shape
    torch.testing.assert_close(actual, wanted, atol=tolerance[dtype], rtol=tolerance[dtype])


# --- eager: our layer, PEFT, merge and unmerge, gradients


def check_eager(case: Case) -> None:
    base, model, x = adapted(case)
    weight = model.proj.base_weight().detach().clone()
    wanted = expected(model, x)
    with torch.no_grad():
        assert_close(model(x), wanted, case.dtype)
    variants = {adapter.variant for adapter in case.adapters}
    if len(case.adapters) == 1:  # PEFT computes every adapter of a layer with the first one's variant
        theirs = peft.get_peft_model(clone(base), _config(case.adapters[0]).to_peft()).eval()
        with torch.no_grad():
            theirs.base_model.model.proj.miss_block["default"].copy_(model.proj.miss_block["a0"])
            assert_close(theirs(x), wanted, case.dtype)
    if case.dtype == torch.float32:  # block gradients against autograd through the reference
        blocks = [model.proj.miss_block[name] for name in model.proj.active_adapters]
        model(x).square().sum().backward()
        ours = [block.grad.clone() for block in blocks]
        leaves = [block.detach().clone().requires_grad_() for block in blocks]
        terms = list(zip(leaves, [model.proj.miss_variant[n] for n in model.proj.active_adapters], strict=True))
        reference.forward(x, weight, model.proj.base_layer.bias, terms).square().sum().backward()
        for got, leaf in zip(ours, leaves, strict=True):
            torch.testing.assert_close(got, leaf.grad, atol=1e-4, rtol=1e-4)
    merge_adapters(model)
    with torch.no_grad():
        assert_close(model(x), wanted, case.dtype)
    unmerge_adapters(model)
    restored = model.proj.base_weight().detach()
    if variants == {"bat"} or "bat" not in variants:
        torch.testing.assert_close(restored, weight, atol=TOLERANCE[case.dtype], rtol=TOLERANCE[case.dtype])


def test_eager_layer_merge_and_peft_match_reference(fuzz):
    fuzz.run(cases(), check_eager, examples=160)


# --- a live PEFT model with several adapters, merged through our verbs


def check_peft_several(case: Case) -> None:
    """PEFT computes a layer's adapters with its first adapter's variant, so all share it here."""
    first = case.adapters[0]
    adapters = [adapter if adapter.variant == first.variant else first for adapter in case.adapters]
    names = [f"a{i}" for i in range(len(adapters))]
    torch.manual_seed(case.seed)
    base = OneLinear(case.in_features, case.out_features, case.bias).eval()
    theirs = peft.get_peft_model(clone(base), _config(first).to_peft(), adapter_name=names[0])
    for name, adapter in zip(names[1:], adapters[1:], strict=True):
        theirs.add_adapter(name, _config(adapter).to_peft())
    theirs.base_model.set_adapter(names)
    layer = theirs.base_model.model.proj
    with torch.no_grad():
        for block in layer.miss_block.values():
            block.copy_(torch.randn(block.shape) * 0.1)
    theirs.eval()
    x = torch.randn(*case.lead, case.in_features)
    terms = [(layer.miss_block[name].detach(), adapter.variant) for name, adapter in zip(names, adapters, strict=True)]
    wanted = reference.forward(x, layer.base_layer.weight.detach(), layer.base_layer.bias, terms)
    with torch.no_grad():
        assert_close(theirs(x), wanted, case.dtype)
        merge_adapters(theirs)
        assert_close(theirs(x), wanted, case.dtype)


def test_peft_several_adapters_merge_through_our_verbs(fuzz):
    fuzz.run(cases(dtypes=(torch.float32,)), check_peft_several, examples=32)


# --- miss_backend (unmerged and merged) through Inductor


def check_compiled(case_and_merge: tuple[Case, bool]) -> None:
    case, merge = case_and_merge
    torch._dynamo.reset()
    _, model, x = adapted(case)
    model.requires_grad_(False)
    wanted = expected(model, x)
    backend = make_backend(merge=merge)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    with torch.no_grad():
        assert_close(compiled(x), wanted, case.dtype)
    (report,) = backend.graph_pass.reports
    variants = {adapter.variant for adapter in case.adapters}
    if variants == {"bat"} or "bat" not in variants:  # bat mixed with others runs the reference fold, no op
        (rewrite,) = report.rewritten
        assert rewrite.adapters == len(case.adapters) and rewrite.merged == merge
    else:
        assert not report.rewritten


@pytest.mark.slow
def test_compiled_matches_reference(fuzz):
    strategy = st.tuples(cases(max_features=24, max_adapters=2, max_lead=4), st.booleans())
    fuzz.run(strategy, check_compiled, examples=8)


# --- ONNX (merged and unmerged) on onnxruntime


def check_onnx(case_and_merge: tuple[Case, bool], folder: object) -> None:
    case, merged = case_and_merge
    _, model, x = adapted(case)
    path = folder / f"fuzz-{time.monotonic_ns()}.onnx"
    example = torch.randn(*[max(size, 2) for size in case.lead], case.in_features)  # dynamic sizes need >= 2
    dtype = case.dtype if case.dtype != torch.float32 else None
    export_onnx(model, args=(example,), path=path, merged=merged, dtype=dtype)
    session = load_session(path, device="cpu")
    half = model.to(case.dtype)
    for inputs in (x, example):
        inputs = inputs.to(case.dtype)
        (actual,) = session.run({session.input_names[0]: inputs})
        assert_close(actual, expected(half, inputs), case.dtype, ONNX_TOLERANCE)
    path.unlink()


@pytest.mark.slow
def test_onnx_matches_reference(fuzz, tmp_path):
    strategy = st.tuples(cases(max_features=24, max_adapters=2, dtypes=(torch.float32, torch.float16), max_lead=4),
                         st.booleans())
    fuzz.run(strategy, lambda case: check_onnx(case, tmp_path), examples=8)
