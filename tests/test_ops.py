"""The miss ops against the reference: values, gradients, and torch.library.opcheck."""

import pytest
import torch
from cases import BAT_CASES, LINEAR_CASES
from helpers import make_case, run_op

from miss_compile import ops, reference


@pytest.mark.parametrize("name", list(LINEAR_CASES) + list(BAT_CASES))
def test_op_matches_reference_values_and_gradients(name):
    x, weight, bias, blocks, variants = make_case({**LINEAR_CASES, **BAT_CASES}[name])
    out = run_op(x, weight, bias, blocks, variants)
    expected = reference.forward(x, weight, bias, list(zip(blocks, variants, strict=True)))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *blocks], grad)
    want = torch.autograd.grad(expected, [x, *blocks], grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["balance-padded", "two-adapters", "bat"])
def test_bf16_input_with_fp32_blocks(name):
    x, weight, bias, blocks, variants = make_case({**LINEAR_CASES, **BAT_CASES}[name], dtype=torch.bfloat16)
    out = run_op(x, weight, bias, blocks, variants)
    assert out.dtype == torch.bfloat16
    expected = reference.forward(x, weight, bias, list(zip(blocks, variants, strict=True)))
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and all(b.grad.dtype == torch.float32 for b in blocks)


@pytest.mark.parametrize("name", list(LINEAR_CASES) + list(BAT_CASES))
def test_opcheck(name):
    x, weight, bias, blocks, variants = make_case({**LINEAR_CASES, **BAT_CASES}[name])
    if variants[0] == "bat":
        op, args = torch.ops.miss.bat_linear.default, (x, weight.requires_grad_(), bias, blocks)
    else:
        op, args = torch.ops.miss.linear.default, (x, [x.detach().clone().requires_grad_() for _ in blocks], weight, bias, blocks)
    torch.library.opcheck(op, args)


def test_balance_backward_saves_chunk_sums_not_x():
    x, weight, bias, blocks, _ = make_case(LINEAR_CASES["balance"], seed=1)
    x = torch.randn(64, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.miss_linear(x, [x], weight, bias, blocks)
    assert not any(t.shape == x.shape for t in saved)
    assert any(t.shape == (64, 4) for t in saved)  # S(x): tokens x r


def test_shape_errors_name_the_shapes():
    x = torch.randn(2, 10)
    with pytest.raises(RuntimeError, match=r"x has 10 features, weight \(6, 8\) expects 8"):
        ops.miss_linear(x, [x], torch.randn(6, 8), None, [torch.randn(2, 6)])
    with pytest.raises(RuntimeError, match=r"block \(2, 4\) does not tile out_features=6"):
        ops.miss_linear(x, [x], torch.randn(6, 10), None, [torch.randn(2, 4)])
    with pytest.raises(RuntimeError, match=r"block \(3, 2, 2\) does not tile weight \(6, 9\)"):
        ops.bat_linear(torch.randn(2, 9), torch.randn(6, 9), None, [torch.randn(3, 2, 2)])
