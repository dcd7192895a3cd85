"""Code that looks like a MiSS adapter but is not one: the pass leaves it as it was, numbers unchanged.

test_passes covers a branch reading another graph input, a sum over the wrong dim, a computed
block, a branch used twice and a non-linear adapter input; these are the rest.
"""

import operator

import pytest
import torch
import torch.nn.functional as F
from test_passes import LINEARS, compile_pass_only, count
from torch import nn

from miss_compile import make_backend
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
