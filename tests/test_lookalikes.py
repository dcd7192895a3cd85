"""Code that looks like a MiSS adapter but is not one: the pass leaves it as it was, numbers unchanged.

test_passes covers a branch reading another graph input, a sum over the wrong dim, a computed
block, a branch used twice and a non-linear adapter input; these are the rest.
"""

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from helpers import LINEARS, compile_pass_only, count
from torch import nn

from miss_compile import make_backend
from miss_compile.explain import pass_only_backend
from miss_compile.passes import MISS_OPS


def chunk_sum(x: torch.Tensor, r: int = 4) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // r, r).sum(-2)  # x: [..., 12] -> [..., r]


class Siblings(nn.Module):
    """Two Linears of the same shape; the branch on `a` reads `b`'s input."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(12, 8), nn.Linear(12, 8)
        self.block = nn.Parameter(torch.randn(4, 8) * 0.1)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return self.a(x) + chunk_sum(other) @ self.block + self.b(other)


class ChunkSumAlone(nn.Module):
    """A reshape-sum-matmul on another tensor, added to a Linear's output only after a non-linearity."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 8)
        self.block = nn.Parameter(torch.randn(4, 8) * 0.1)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x)) + chunk_sum(other) @ self.block


class WrongBlock(nn.Module):
    """Blocks whose shape is not [r, out] (nor [r, mini_r] repeated along out), though they broadcast."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(12, 8)
        shapes = {"column": (4, 1), "batched": (2, 4, 8), "repeated rows": (2, 8)}
        self.block = nn.Parameter(torch.randn(shapes[kind]) * 0.1)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        block = self.block.repeat(2, 1) if self.kind == "repeated rows" else self.block
        return self.proj(x) + chunk_sum(x) @ block


class CustomAdapter(nn.Module):
    """A home-made adapter module PEFT does not know, with its own arithmetic."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.base_layer = nn.Linear(12, 8)
        self.miss_block = nn.Parameter(torch.randn(4, 8) * 0.1)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.kind == "scaled":
            return y + 0.5 * (chunk_sum(x) @ self.miss_block)
        if self.kind == "subtracted":
            return y - chunk_sum(x) @ self.miss_block
        if self.kind == "transposed block":
            return y + chunk_sum(x) @ self.miss_block.t().t()
        if self.kind == "on the output":
            return y + chunk_sum(F.pad(y, (0, 4))) @ self.miss_block
        raise AssertionError(self.kind)


LOOK_ALIKES = {
    "branch reads a sibling Linear's input": (Siblings, 2),
    "chunk sum of another tensor": (ChunkSumAlone, 1),
    "block [4, 1] broadcast over out": (lambda: WrongBlock("column"), 1),
    "block [2, 4, 8] batched": (lambda: WrongBlock("batched"), 1),
    "block repeated along r": (lambda: WrongBlock("repeated rows"), 1),
    "custom adapter, scaled": (lambda: CustomAdapter("scaled"), 1),
    "custom adapter, subtracted": (lambda: CustomAdapter("subtracted"), 1),
    "custom adapter, transposed block": (lambda: CustomAdapter("transposed block"), 1),
    "custom adapter, reads the output": (lambda: CustomAdapter("on the output"), 1),
}


@pytest.mark.parametrize("case", list(LOOK_ALIKES))
def test_look_alike_is_left_alone(case):
    make, linears = LOOK_ALIKES[case]
    torch.manual_seed(0)
    model = make().eval()
    x, other = torch.randn(2, 3, 12), torch.randn(2, 3, 12)
    compiled, reports, graphs = compile_pass_only(model)
    torch.testing.assert_close(compiled(x, other), model(x, other), atol=0, rtol=0)
    (graph,) = graphs
    assert count(graph, MISS_OPS) == 0 and count(graph, LINEARS) == linears
    assert not reports[0].rewritten


class SharedWeight(nn.Module):
    """A real MiSS Linear whose weight is read elsewhere too (as tied weights are)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 8)
        self.block = nn.Parameter(torch.randn(4, 8) * 0.1, requires_grad=False)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(x) + chunk_sum(x) @ self.block, other @ self.proj.weight.t()


def test_shared_weight_other_use_keeps_the_plain_weight():
    """The adapted Linear may become a miss op; the other read of W must stay a plain matmul on W,
    never see the merged weight, and never become a miss op."""
    torch.manual_seed(0)
    model = SharedWeight().eval()
    x, other = torch.randn(2, 3, 12), torch.randn(2, 3, 12)
    expected = model(x, other)
    compiled, reports, graphs = compile_pass_only(model)
    for got, want in zip(compiled(x, other), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert count(graphs[0], MISS_OPS) == 1 and len(reports[0].rewritten) == 1
    assert count(graphs[0], (torch.matmul, operator.matmul)) == 1  # `other @ W.T` untouched


@pytest.mark.slow
def test_shared_weight_through_merging_inductor():
    torch.manual_seed(0)
    model = SharedWeight().eval()
    model.proj.requires_grad_(False)
    x, other = torch.randn(2, 3, 12), torch.randn(2, 3, 12)
    backend = make_backend(merge=True)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        expected = model(x, other)
        got = compiled(x, other)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], other @ model.proj.weight.t(), atol=1e-6, rtol=1e-6)  # W, not W'
    (report,) = backend.graph_pass.reports
    assert [item.merged for item in report.rewritten] == [True]


# --- forms the pass must read completely (issue 13): keywords, writes, crops, plain code


def bat_weight(weight: torch.Tensor, block: torch.Tensor, alpha: float = 1) -> torch.Tensor:
    """PEFT's bat fold written out: W + reshape(permute(W4 @ D + D)), with an optional add alpha."""
    out_features, in_features = weight.shape
    r = block.shape[-1]
    blocks = weight.reshape(out_features // r, r, in_features // r, r).permute(2, 0, 1, 3)
    delta = torch.add(blocks @ block, block, alpha=alpha).permute(1, 2, 0, 3).reshape(out_features, in_features)
    return weight + delta


class Form(nn.Module):
    """A Linear(12, 8) with a MiSS-looking branch written in one of many forms."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(12, 8)
        self.block = nn.Parameter(torch.randn(4, 8) * 0.1)
        self.bat_block = nn.Parameter(torch.randn(2, 4, 4) * 0.1)
        self.other_weight = nn.Parameter(torch.randn(8, 12) * 0.1)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:  # noqa: C901 (a table of forms)
        kind, proj, block = self.kind, self.proj, self.block
        if kind == "add alpha=2":
            return torch.add(proj(x), chunk_sum(x) @ block, alpha=2)
        if kind == "add alpha=1, other=":
            return torch.add(proj(x), other=chunk_sum(x) @ block, alpha=1)
        if kind == "method add alpha=0.5":
            return proj(x).add(chunk_sum(x) @ block, alpha=0.5)
        if kind == "second adapter alpha=3":
            return torch.add(proj(x) + chunk_sum(x) @ block, chunk_sum(x) @ (block * 1), alpha=3)
        if kind == "sum dtype=":
            return proj(x) + torch.sum(x.reshape(*x.shape[:-1], 3, 4), dim=-2, dtype=torch.float32) @ block
        if kind == "sum keepdim=False kwarg, dim=[-2]":
            return proj(x) + torch.sum(x.reshape(*x.shape[:-1], 3, 4), dim=[-2], keepdim=False) @ block
        if kind == "bat alpha=2":
            return F.linear(x, bat_weight(proj.weight, self.bat_block, alpha=2), proj.bias)
        if kind == "bat":
            return F.linear(x, bat_weight(proj.weight, self.bat_block), proj.bias)
        if kind == "x.mul_ inside the branch":
            y = proj(x)
            x.mul_(2)
            return y + chunk_sum(x) @ block
        if kind == "view of x written inside the branch":
            y = proj(x)
            x.view(-1).add_(1)
            return y + chunk_sum(x) @ block
        if kind == "setitem on x inside the branch":
            y = proj(x)
            x[..., 0] = 5.0
            return y + chunk_sum(x) @ block
        if kind == "out= inside the branch":
            y = proj(x)
            torch.mul(other, 2, out=x)
            return y + chunk_sum(x) @ block
        if kind == "block written inside the branch":
            y = proj(x)
            with torch.no_grad():
                block.mul_(2)
            return y + chunk_sum(x) @ block
        if kind == "bat: x written before its Linear":
            weight = bat_weight(proj.weight, self.bat_block)
            cast = x.to(torch.float32)
            x.mul_(2)
            return F.linear(cast, weight, proj.bias), x
        if kind == "negative pad (crop)":
            return proj(x) + F.pad(x, (0, -4)).reshape(*x.shape[:-1], 2, 4).sum(-2) @ block
        if kind == "pad on another dim":
            return proj(x) + F.pad(x, (0, 4, 0, 0)).reshape(*x.shape[:-1], 4, 4).sum(-2) @ block
        if kind == "pad value 1":
            return proj(x) + F.pad(x, (0, 4), value=1.0).reshape(*x.shape[:-1], 4, 4).sum(-2) @ block
        if kind == "cast through int32":
            return proj(x) + chunk_sum(x.to(torch.int32).to(torch.float32)) @ block
        if kind == "add other= on a plain Linear":
            return torch.add(proj(x), other=other[..., :8])
        if kind == "linear of add other=":
            return F.linear(x, torch.add(proj.weight, other=self.other_weight))
        raise AssertionError(kind)


# kind: (rewritten?, words the reason for leaving it must contain)
FORMS = {
    "add alpha=2": (False, "alpha=2"),
    "add alpha=1, other=": (True, ""),
    "method add alpha=0.5": (False, "alpha=0.5"),
    "second adapter alpha=3": (True, ""),  # the first adapter is matched; the alpha add stays, reading the op
    "sum dtype=": (False, "dtype"),
    "sum keepdim=False kwarg, dim=[-2]": (True, ""),
    "bat alpha=2": (False, "alpha=2"),
    "bat": (True, ""),
    "x.mul_ inside the branch": (False, "mul_(...) may write"),
    "view of x written inside the branch": (False, "add_(...) may write"),
    "setitem on x inside the branch": (False, "setitem(...) may write"),
    "out= inside the branch": (False, "may write"),
    "block written inside the branch": (False, "may write"),
    "bat: x written before its Linear": (False, "mul_(...) may write"),
    "negative pad (crop)": (False, "pads (0, -4)"),
    "pad on another dim": (False, "pads (0, 4, 0, 0)"),
    "pad value 1": (False, "pad value"),
    "cast through int32": (False, "through torch.int32"),
    "add other= on a plain Linear": (False, None),  # plain code: no adapter, nothing to report
    "linear of add other=": (False, "other_weight_ is not a reshape"),
}


@pytest.mark.parametrize("kind", list(FORMS))
def test_forms_are_read_completely(kind):
    """Keywords are read (alpha= is never dropped), nothing moves across a write, a crop is not x,
    and plain code never crashes the compile."""
    rewritten, reason = FORMS[kind]
    torch.manual_seed(0)
    model = Form(kind).eval()
    x, other = torch.randn(2, 3, 12), torch.randn(2, 3, 12)
    expected = copy.deepcopy(model)(x.clone(), other)  # some forms write to their block
    compiled, reports, graphs = compile_pass_only(model)
    got = compiled(x.clone(), other)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    (report,) = reports
    if rewritten:
        assert len(report.rewritten) == 1 and count(graphs[0], MISS_OPS) == 1
        return
    assert count(graphs[0], MISS_OPS) == 0 and not report.rewritten
    if reason is None:
        assert not report.skipped
    else:
        (layer, why), = report.skipped
        assert reason in why, why


@pytest.mark.parametrize("kind", ["cast through bf16", "cast fp32 to bf16 and back", "negative pad"])
def test_merge_folds_only_an_adapter_input_that_is_x(kind):
    """merge=True folds x @ (W + dW): only when S(adapter input) is S(x) exactly. A rounded x stays
    an unmerged op (same numbers as eager), with the reason; a crop is not matched at all."""

    class Rounded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(12, 8)
            dtype = torch.bfloat16 if kind == "cast through bf16" else torch.float32
            self.block = nn.Parameter(torch.randn(4, 8, dtype=dtype) * 0.1, requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if kind == "cast through bf16":
                return self.proj(x) + chunk_sum(x.to(torch.bfloat16)) @ self.block
            if kind == "cast fp32 to bf16 and back":
                return self.proj(x) + chunk_sum(x.to(torch.bfloat16).float()) @ self.block
            return self.proj(x) + F.pad(x, (0, -4)).reshape(*x.shape[:-1], 2, 4).sum(-2) @ self.block

    torch.manual_seed(0)
    model = Rounded().eval().requires_grad_(False)
    x = torch.randn(2, 3, 12) * 3
    reports = []
    compiled = torch.compile(model, backend=pass_only_backend(reports, merge=True), fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-6, rtol=1e-6)
    (report,) = reports
    if kind == "negative pad":
        assert not report.rewritten and "pads (0, -4)" in report.skipped[0][1]
        return
    (item,) = report.rewritten
    assert not item.merged and "rounds x (torch.float32) to torch.bfloat16" in item.not_folded
    assert "not folded: the adapter input rounds x" in str(report)
