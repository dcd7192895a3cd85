"""The pass is never silently wrong: random MiSS-shaped modules, perturbed, against eager.

Every example builds one module (PEFT's MissLinear, or MiSS written as plain code with one random
perturbation: keyword arguments, alpha=, in-place writes inside the branch, casts, pads, shared
weights, checkpointed regions, wrong shapes), compiles it with the pass-only backend (the rewritten
graph runs eagerly, custom ops included) and checks the oracle:
  - never an exception;
  - outputs (and, in fp32 training, gradients) equal eager's;
  - every adapter-looking layer is rewritten or reported as left alone, and forms that are exactly
    MiSS are rewritten.
CI runs a derandomized set; `pytest tests/test_lookalike_fuzz.py --soak=SECONDS` runs fresh seeds
(the shared Fuzzer, tests/fuzzing.py).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

import peft
import pytest
import torch
import torch.nn.functional as F
from hypothesis import reject
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

from miss_compile.explain import pass_only_backend
from miss_compile.passes import PassReport

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
STATS: Counter = Counter()  # across the session: examples, rewritten, untouched, invalid, wrong, errors

# Perturbations that keep the module exactly MiSS: the pass must rewrite these.
BALANCE_EXACT = ("none", "add other=", "add alpha=1", "sum dim=", "sum [dim]", "view", "extra zero pad",
                 "cast to block dtype", "dropout kwargs", "checkpoint", "checkpoint reentrant", "shared weight",
                 "block used twice", "two adapters")
BALANCE_OTHER = ("add alpha", "method add alpha", "sum keepdim", "sum dtype=", "x.mul_", "view of x add_",
                 "setitem x", "out= x", "relu_ x", "block.mul_", "crop pad", "pad value", "pad other dim",
                 "int cast", "bf16 round trip", "inplace dropout", "column block", "sum dim -1", "no_grad term",
                 "term first")
WRITES_AFTER_USE = ("x.mul_", "view of x add_", "setitem x", "out= x", "relu_ x", "W.mul_")
BAT_EXACT = ("none", "add other=", "permute dims=", "checkpoint")
BAT_OTHER = ("data clone", "inner alpha", "outer alpha", "transposed block", "x.mul_", "x bf16 round trip", "W.mul_",
             "another weight")


@dataclass(frozen=True)
class Example:
    form: str  # "balance", "mini", "bat" (plain code) or "peft"
    perturbation: str
    in_features: int
    out_features: int
    r: int
    mini_r: int
    dtype: torch.dtype
    lead: tuple[int, ...]
    merge: bool
    train: bool
    alpha: float
    seed: int


# --- MiSS as plain code, one module class per form


class PlainChunk(nn.Module):
    """balance/mini written out: y = proj(x) + S(chain(x)) @ D, perturbed as the example says."""

    def __init__(self, ex: Example) -> None:
        super().__init__()
        self.ex = ex
        self.proj = nn.Linear(ex.in_features, ex.out_features)
        self.proj2 = nn.Linear(ex.in_features, ex.out_features)
        width = ex.mini_r if ex.form == "mini" else ex.out_features
        self.block = nn.Parameter(torch.randn(ex.r, width) * 0.1)
        self.block2 = nn.Parameter(torch.randn(ex.r, width) * 0.1)
        self.column = nn.Parameter(torch.randn(ex.r, 1) * 0.1)

    def expanded(self, block: torch.Tensor) -> torch.Tensor:
        return block.repeat(1, self.ex.out_features // self.ex.mini_r) if self.ex.form == "mini" else block

    def chunk_sum(self, x: torch.Tensor) -> torch.Tensor:  # noqa: C901 (one branch per perturbation)
        p, r = self.ex.perturbation, self.ex.r
        a, width = x, x.shape[-1]
        padding = (r - width % r) % r
        if p == "extra zero pad":
            padding += r
        if p == "crop pad" and width > r:
            a, width = F.pad(a, (0, -(width % r or r))), width - (width % r or r)
        elif p == "pad value":
            a, width = F.pad(a, (0, padding + r), value=1.0), width + padding + r
        elif p == "pad other dim":
            a, width = F.pad(a, (0, padding, 0, 0)), width + padding
        elif padding:
            a, width = F.pad(a, (0, padding)), width + padding
        if p == "int cast":
            a = a.to(torch.int32).to(x.dtype)
        elif p == "bf16 round trip":
            a = a.to(torch.bfloat16).to(x.dtype)
        elif p == "cast to block dtype":
            a = a.to(self.block.dtype)
        if p == "dropout kwargs":
            a = F.dropout(a, p=0.3, training=False)
        elif p == "inplace dropout":
            a = F.dropout(a, 0.0, False, True)
        else:
            a = F.dropout(a, 0.2, False, False)
        lead = a.shape[:-1]
        chunks = a.view(*lead, width // r, r) if p == "view" else a.reshape(*lead, width // r, r)
        if p == "sum dim=":
            return torch.sum(chunks, dim=-2)
        if p == "sum [dim]":
            return chunks.sum([-2])
        if p == "sum keepdim":
            return torch.sum(chunks, -2, keepdim=True)
        if p == "sum dtype=":
            return torch.sum(chunks, dim=-2, dtype=x.dtype)
        if p == "sum dim -1" and width // r == r:
            return chunks.sum(-1)
        return torch.sum(chunks, dim=-2)

    def adapted(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:  # noqa: C901
        p = self.ex.perturbation
        y = self.proj(x)
        if p == "x.mul_":
            x.mul_(2)
        elif p == "view of x add_":
            x.view(-1).add_(1)
        elif p == "setitem x":
            x[..., 0] = 3.0
        elif p == "out= x":
            torch.mul(other, 2, out=x)
        elif p == "relu_ x":
            F.relu(x, inplace=True)
        elif p == "block.mul_":
            with torch.no_grad():
                self.block.mul_(1.5)
        block = self.column if p == "column block" else self.expanded(self.block)
        if p == "no_grad term":
            with torch.no_grad():
                term = self.chunk_sum(x) @ block
        else:
            term = self.chunk_sum(x) @ block
        if p in ("add alpha", "add alpha=1"):
            out = torch.add(y, term, alpha=1 if p == "add alpha=1" else self.ex.alpha)
        elif p == "method add alpha":
            out = y.add(term, alpha=self.ex.alpha)
        elif p == "add other=":
            out = torch.add(y, other=term)
        elif p == "term first":
            out = term + y
        else:
            out = y + term
        if p == "two adapters":
            out = out + self.chunk_sum(x) @ self.expanded(self.block2)
        return out

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p = self.ex.perturbation
        if p.startswith("checkpoint"):
            out = checkpoint(self.adapted, x, other, use_reentrant=p == "checkpoint reentrant")
        else:
            out = self.adapted(x, other)
        if p == "shared weight":
            return out, F.linear(other, self.proj.weight)
        if p == "block used twice":
            return out, self.proj2(other) + self.chunk_sum(other) @ self.expanded(self.block)
        return (out,)


class PlainBat(nn.Module):
    """bat written out as PEFT computes it: linear(x, W + reshape(permute(W4 @ D + D)), b)."""

    def __init__(self, ex: Example) -> None:
        super().__init__()
        self.ex = ex
        self.proj = nn.Linear(ex.in_features, ex.out_features)
        self.other_weight = nn.Parameter(torch.randn(ex.out_features, ex.in_features) * 0.1)
        self.block = nn.Parameter(torch.randn(ex.out_features // ex.r, ex.r, ex.r) * 0.1)

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        p, r, alpha = self.ex.perturbation, self.ex.r, self.ex.alpha
        weight = self.proj.weight.data.clone() if p == "data clone" else self.proj.weight
        out_features, in_features = weight.shape
        source = self.other_weight if p == "another weight" else weight
        grid = source.reshape(out_features // r, r, in_features // r, r)
        blocks = torch.permute(grid, dims=(2, 0, 1, 3)) if p == "permute dims=" else grid.permute(2, 0, 1, 3)
        block_t = self.block.transpose(-1, -2) if p == "transposed block" else self.block
        inner = torch.add(blocks @ block_t, self.block, alpha=alpha) if p == "inner alpha" else blocks @ block_t + self.block
        delta = inner.permute(1, 2, 0, 3).reshape(out_features, in_features)
        if p == "outer alpha":
            folded = torch.add(weight, delta, alpha=alpha)
        elif p == "add other=":
            folded = torch.add(weight, other=delta)
        else:
            folded = weight + delta
        if p == "x.mul_":
            x.mul_(2)
        elif p == "W.mul_":
            with torch.no_grad():
                self.proj.weight.mul_(1.5)
        if p == "x bf16 round trip":
            x = x.to(torch.bfloat16).to(x.dtype)
        return F.linear(x, folded, self.proj.bias)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.ex.perturbation == "checkpoint":
            return (checkpoint(self.adapted, x, use_reentrant=False),)
        return (self.adapted(x),)


class PeftOne(nn.Module):
    """A Linear adapted by PEFT's MissLinear (one or two adapters), checkpointed or not."""

    def __init__(self, ex: Example) -> None:
        super().__init__()
        self.ex = ex
        base = nn.Sequential()
        base.proj = nn.Linear(ex.in_features, ex.out_features).to(ex.dtype)
        variant = {"balance": True, "mini": "mini", "bat": "bat"}[ex.perturbation.split()[0]]
        config = peft.MissConfig(r=ex.r, mini_r=ex.mini_r, init_weights=variant, target_modules=["proj"],
                                 miss_dropout=0.0 if variant == "bat" else 0.1)
        self.model = peft.get_peft_model(base, config)
        if "two adapters" in ex.perturbation:
            self.model.add_adapter("second", config)
            self.model.base_model.set_adapter(["default", "second"])
        generator = torch.Generator().manual_seed(ex.seed)
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if "miss_block" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if "checkpoint" in self.ex.perturbation:
            return (checkpoint(self.model, x, use_reentrant=False),)
        return (self.model(x),)


# --- examples


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def examples(draw: st.DrawFn, forms: tuple[str, ...]) -> Example:
    form = draw(st.sampled_from(forms))
    dtype = draw(st.sampled_from((torch.float32, torch.float32, torch.bfloat16)))
    lead = draw(st.sampled_from(((3,), (1,), (2, 3), (1, 1), (2, 1))))
    if form == "peft":
        variant = draw(st.sampled_from(("balance", "mini", "bat")))
        extras = draw(st.sampled_from(("", " two adapters", " checkpoint")))
        perturbation = variant + extras
    else:
        variant = form
        exact, other = (BAT_EXACT, BAT_OTHER) if form == "bat" else (BALANCE_EXACT, BALANCE_OTHER)
        perturbation = draw(st.sampled_from(exact + other))
    if variant == "bat":
        r = draw(st.sampled_from((1, 2, 4)))
        in_features, out_features = r * draw(st.integers(1, 4)), r * draw(st.integers(1, 4))
    else:
        in_features, out_features = draw(st.integers(1, 20)), draw(st.integers(1, 20))
        r = draw(st.integers(1, max(1, in_features)))
    mini_r = draw(st.sampled_from(_divisors(out_features))) if variant == "mini" else 1
    merge = draw(st.booleans())
    # Eager autograd refuses a write to a tensor it saved (x, W): those run without grad.
    train = not merge and perturbation not in WRITES_AFTER_USE and draw(st.booleans())
    alpha = draw(st.sampled_from((2.0, 0.5, -1.0)))
    return Example(form, perturbation, in_features, out_features, r, mini_r, dtype, lead, merge, train, alpha,
                   draw(st.integers(0, 2**16)))


def build(ex: Example) -> nn.Module:
    torch.manual_seed(ex.seed)
    if ex.form == "peft":
        model = PeftOne(ex)
    else:
        model = (PlainBat if ex.form == "bat" else PlainChunk)(ex).to(ex.dtype)
    if ex.merge:
        model.requires_grad_(False)
    return model.train(False)


def inputs(ex: Example) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(ex.seed + 1)
    shape = (*ex.lead, ex.in_features)
    return (torch.randn(shape, generator=generator).to(ex.dtype), torch.randn(shape, generator=generator).to(ex.dtype))


def run(model: nn.Module, ex: Example, backend: object | None) -> tuple[tuple[torch.Tensor, ...], list]:
    """Outputs and, in fp32 training, the gradients of every parameter and of x."""
    x, other = inputs(ex)
    x = x.requires_grad_(ex.train and ex.dtype == torch.float32)
    forward = model if backend is None else torch.compile(model, backend=backend, dynamic=False)
    if not x.requires_grad:
        with torch.no_grad():
            return forward(x.clone(), other), []
    outputs = forward(x.clone(), other)  # a clone: some perturbations write to x
    sum(out.float().sum() for out in outputs).backward()
    return tuple(out.detach() for out in outputs), [x.grad] + [param.grad for param in model.parameters()]


def adapter_looking(ex: Example) -> int:
    """How many layers carry a branch that looks like an adapter (each must show in the report)."""
    if ex.perturbation in ("block used twice",):
        return 2
    return 1


def must_rewrite(ex: Example) -> bool:
    if ex.form == "peft":
        return True
    exact = BAT_EXACT if ex.form == "bat" else BALANCE_EXACT
    return ex.perturbation in exact


def check(ex: Example) -> None:
    STATS["examples"] += 1
    torch._dynamo.reset()
    model = build(ex)
    try:
        expected, expected_grads = run(copy.deepcopy(model), ex, None)
    except RuntimeError:  # not valid eager code (shapes that do not broadcast, autograd refusing a write)
        STATS["invalid"] += 1
        reject()
    reports: list[PassReport] = []
    try:
        got, grads = run(model, ex, pass_only_backend(reports, merge=ex.merge))
    except Exception:
        STATS["errors"] += 1
        raise
    tolerance = TOLERANCE[ex.dtype]
    try:
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, atol=tolerance, rtol=tolerance)
        for a, b in zip(grads, expected_grads, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    except AssertionError:
        STATS["wrong"] += 1
        raise
    rewritten = [item for report in reports for item in report.rewritten]
    skipped = [entry for report in reports for entry in report.skipped]
    STATS["rewritten"] += bool(rewritten)
    STATS["untouched"] += not rewritten
    assert len(rewritten) + len(skipped) >= adapter_looking(ex), f"an adapter-looking layer is not in the report: {reports}"
    if must_rewrite(ex):
        assert rewritten, f"an exact MiSS form was left alone: {reports}"
        assert not any(why.startswith("internal matcher error") for _, why in skipped), skipped


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"\nlook-alike fuzz: {dict(STATS)}")
    assert STATS["wrong"] == 0 and STATS["errors"] == 0, dict(STATS)


def test_plain_forms_are_rewritten_exactly_or_left_and_reported(fuzz):
    fuzz.run(examples(("balance", "mini", "bat")), check, examples=150)


def test_peft_forms_are_rewritten_exactly(fuzz):
    fuzz.run(examples(("peft",)), check, examples=60)
