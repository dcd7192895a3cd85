"""fold_rule on both sides of its bound: the generated code folds (or not) forward and backward
separately, the numbers match the reference either way, and the fold never saves more than stock."""

import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck

from miss_compile import MissConfig, apply_miss, make_backend, reference
from miss_compile.fold_rule import folds


class OneLinear(nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize(
    ("tokens", "in_features", "out_features", "backward", "expected"),
    [
        (64, 64, 48, False, True),  # W + dW (64 x 48) == the output [64, 48]: fold
        (63, 64, 48, False, False),  # one token fewer: W + dW is larger than the output
        (48, 64, 48, True, True),  # x's gradient is [tokens, 64]: folds from 48 tokens
        (47, 64, 48, True, False),
        (512, 4096, 14336, False, False),  # 8B gate_proj at 512 tokens: never (224 MiB transient)
        (512, 14336, 4096, True, False),  # 8B down_proj's x gradient
        (None, 8, 8, False, False),  # unknown token count: the separate GEMM
    ],
)
def test_the_bound_on_both_sides(tokens, in_features, out_features, backward, expected):
    assert folds(tokens, in_features, out_features, "cpu", backward) is expected


def _step(in_features, out_features, tokens, r=16):
    torch.manual_seed(0)
    model = apply_miss(OneLinear(in_features, out_features),
                       MissConfig(r=r, init="random", target_modules=["proj"]))
    weight, block = model.proj.base_layer.weight, model.proj.miss_block["default"]
    x = torch.randn(tokens, in_features, requires_grad=True)
    compiled = torch.compile(model, backend=make_backend())
    out, (forward_code, backward_code) = run_and_get_code(lambda: _loss_and_backward(compiled, x))
    # the reference: y = x @ W'.T, and autograd through it for x and the block
    x_ref = x.detach().clone().requires_grad_(True)
    block_ref = block.detach().clone().requires_grad_(True)
    expected = reference.forward(x_ref, weight.detach(), None, [(block_ref, "balance")])
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(block.grad, block_ref.grad, atol=1e-4, rtol=1e-4)
    return forward_code.split("def call")[1], backward_code.split("def call")[1]


def _loss_and_backward(compiled, x):
    out = compiled(x)
    out.square().sum().backward()
    return out.detach()


def test_above_the_bound_folds_forward_and_backward():
    forward, backward = _step(in_features=64, out_features=48, tokens=64)
    # forward: one GEMM on W + dW, no chunk sum GEMM; backward: grad @ (W + dW) and S(x).T @ grad
    FileCheck().check_count("extern_kernels.mm(", 1, exactly=True).run(forward)
    assert forward.count("extern_kernels.") == 1
    FileCheck().check_count("extern_kernels.mm(", 2, exactly=True).run(backward)
    assert backward.count("extern_kernels.") == 2


def test_below_the_bound_keeps_the_adapter_gemm_forward_and_backward():
    forward, backward = _step(in_features=64, out_features=48, tokens=40)
    # forward: S(x) @ D, then addmm with it as input; backward: grad @ W, grad @ D.T, S(x).T @ grad
    FileCheck().check_count("extern_kernels.mm(", 1, exactly=True).check("extern_kernels.addmm(").run(forward)
    assert forward.count("extern_kernels.") == 2
    assert backward.count("extern_kernels.") == 3, backward


def test_between_the_bounds_forward_and_backward_choose_apart():
    # 56 tokens: the forward output [56, 48] is smaller than W (64 x 48), x's gradient [56, 64] is not
    forward, backward = _step(in_features=64, out_features=48, tokens=56)
    FileCheck().check("extern_kernels.addmm(").run(forward)
    assert forward.count("extern_kernels.") == 2
    assert backward.count("extern_kernels.") == 2, backward
