"""MissLinear against PEFT's MissLinear (the second oracle): forward, gradients, merge, unmerge."""

import peft
import pytest
import torch
from helpers import clone, copy_blocks, randomize_blocks
from torch import nn

from miss_compile import MissConfig, apply_miss, merge_adapters, unmerge_adapters
from miss_compile.peft_compat import named_miss_layers


class OneLinear(nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.proj(x)


def _cases():
    for r in (1, 3, 8, 16):
        yield pytest.param("balance", 40, 24, r, 1, id=f"balance-r{r}-in40")  # 40 % r != 0 for r = 3, 16
        yield pytest.param("mini", 40, 24, r, 4, id=f"mini-r{r}-in40")
        yield pytest.param("bat", 48, 48, r, 1, id=f"bat-r{r}")
    yield pytest.param("balance", 48, 24, 8, 1, id="balance-divisible")
    yield pytest.param("mini", 37, 24, 8, 24, id="mini-equals-balance")


CASES = list(_cases())
INPUT_SHAPES = [(5,), (2, 3), (1, 1)]
TOLERANCE = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


def make_pair(variant, in_features, out_features, r, mini_r, dtype=torch.float32, dropout=0.0):
    torch.manual_seed(0)
    base = OneLinear(in_features, out_features).to(dtype)
    config = MissConfig(r=r, variant=variant, mini_r=mini_r, dropout=dropout, target_modules=["proj"])
    ours = apply_miss(clone(base), config)
    theirs = peft.get_peft_model(clone(base), config.to_peft())
    randomize_blocks(ours)
    copy_blocks(ours, theirs)
    return base, ours.eval(), theirs.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant,in_features,out_features,r,mini_r", CASES)
def test_forward_matches_peft(variant, in_features, out_features, r, mini_r, dtype):
    base, ours, theirs = make_pair(variant, in_features, out_features, r, mini_r, dtype, dropout=0.1)
    assert ours.proj.miss_block["default"].dtype == torch.float32  # PEFT's default: fp32 adapters
    for shape in INPUT_SHAPES:
        x = torch.randn(*shape, in_features).to(dtype)
        expected = theirs(x)
        out = ours(x)
        assert out.dtype == dtype
        torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
        assert not torch.allclose(out.float(), base(x).float(), atol=1e-3)  # the adapter did something


@pytest.mark.parametrize("variant,in_features,out_features,r,mini_r", CASES)
def test_gradients_match_peft(variant, in_features, out_features, r, mini_r):
    _, ours, theirs = make_pair(variant, in_features, out_features, r, mini_r)
    x = torch.randn(2, 3, in_features)
    grads = []
    for model in (ours, theirs):
        x_leaf = x.clone().requires_grad_(True)
        model(x_leaf).square().sum().backward()
        block = named_miss_layers(model)["proj"].miss_block["default"]
        grads.append((x_leaf.grad, block.grad))
        assert named_miss_layers(model)["proj"].base_layer.weight.grad is None  # base frozen
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant,in_features,out_features,r,mini_r", CASES)
def test_merge_matches_peft_and_unmerge_restores(variant, in_features, out_features, r, mini_r, dtype):
    base, ours, theirs = make_pair(variant, in_features, out_features, r, mini_r, dtype)
    x = torch.randn(4, in_features).to(dtype)
    unmerged_out = ours(x)
    merge_adapters(ours)
    merge_adapters(theirs)
    ours_weight = ours.proj.base_layer.weight
    torch.testing.assert_close(ours_weight, theirs.base_model.model.proj.base_layer.weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours(x), unmerged_out, **TOLERANCE[dtype])
    unmerge_adapters(ours)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}
    torch.testing.assert_close(ours.proj.base_layer.weight, base.proj.weight, **tolerance)
    torch.testing.assert_close(ours(x), unmerged_out, **TOLERANCE[dtype])


def test_dropout_is_active_in_training_only():
    _, ours, _ = make_pair("balance", 40, 24, 8, 1, dropout=0.5)
    x = torch.randn(64, 40)
    eval_out = ours(x)
    ours.train()
    torch.manual_seed(3)
    train_out = ours(x)
    assert not torch.allclose(train_out, eval_out, atol=1e-4)
