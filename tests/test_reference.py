"""reference.py against the definitions written out index by index (DESIGN.md's table)."""

import pytest
import torch

from miss_compile import reference
from miss_compile.config import MissConfig


def naive_delta(weight, block, variant):
    out_features, in_features = weight.shape
    delta = torch.zeros(out_features, in_features, dtype=torch.float64)
    w, d = weight.double(), block.double()
    if variant == "bat":
        r = d.shape[-1]
        for p in range(out_features // r):
            for q in range(in_features // r):
                w_pq = w[p * r:(p + 1) * r, q * r:(q + 1) * r]
                delta[p * r:(p + 1) * r, q * r:(q + 1) * r] = w_pq @ d[p] + d[p]
        return delta
    r = d.shape[0]
    for o in range(out_features):
        for i in range(in_features):
            delta[o, i] = d[i % r, o % d.shape[1]] if variant == "mini" else d[i % r, o]
    return delta


CASES = [
    # (variant, in_features, out_features, r, mini_r)
    ("balance", 12, 10, 4, 1),
    ("balance", 13, 10, 4, 1),  # in % r != 0
    ("balance", 7, 5, 1, 1),
    ("balance", 16, 6, 16, 1),
    ("mini", 12, 12, 3, 4),
    ("mini", 11, 12, 3, 2),  # in % r != 0
    ("bat", 12, 8, 4, 1),
    ("bat", 9, 6, 3, 1),
    ("bat", 8, 8, 1, 1),
]


def block_for(variant, in_features, out_features, r, mini_r, dtype=torch.float32):
    shape = {"balance": (r, out_features), "mini": (r, mini_r), "bat": (out_features // r, r, r)}[variant]
    return torch.randn(shape, dtype=dtype) * 0.2


@pytest.mark.parametrize("variant,in_features,out_features,r,mini_r", CASES)
def test_delta_weight_matches_definition(variant, in_features, out_features, r, mini_r):
    weight = torch.randn(out_features, in_features)
    block = block_for(variant, in_features, out_features, r, mini_r)
    delta = reference.delta_weight(weight, block, variant)
    torch.testing.assert_close(delta.double(), naive_delta(weight, block, variant), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant,in_features,out_features,r,mini_r", CASES)
@pytest.mark.parametrize("batch_shape", [(5,), (2, 3), (1,), (1, 1)])
def test_forward_equals_merged_linear(variant, in_features, out_features, r, mini_r, batch_shape):
    weight, bias = torch.randn(out_features, in_features), torch.randn(out_features)
    block = block_for(variant, in_features, out_features, r, mini_r)
    x = torch.randn(*batch_shape, in_features)
    expected = x.double() @ (weight.double() + naive_delta(weight, block, variant)).T + bias.double()
    out = reference.forward(x, weight, bias, [(block, variant)])
    assert out.shape == (*batch_shape, out_features)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("in_features,r", [(12, 4), (13, 4), (5, 5), (7, 3)])
def test_chunk_sum_is_x_times_P(in_features, r):
    x = torch.randn(3, in_features)
    projection = torch.zeros(in_features, r)
    projection[torch.arange(in_features), torch.arange(in_features) % r] = 1.0
    torch.testing.assert_close(reference.chunk_sum(x, r), x @ projection)


@pytest.mark.parametrize("variant,in_features,out_features,r,mini_r", CASES)
def test_unmerge_restores_weight(variant, in_features, out_features, r, mini_r):
    weight = torch.randn(out_features, in_features)
    block = block_for(variant, in_features, out_features, r, mini_r)
    merged = reference.merged_weight(weight, block, variant)
    assert not torch.allclose(merged, weight)
    torch.testing.assert_close(reference.unmerged_weight(merged, block, variant), weight, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["balance", "bat"])
def test_half_precision_merges_in_fp32_and_casts_back(dtype, variant):
    weight = torch.randn(8, 8).to(dtype)
    block = block_for(variant, 8, 8, 4, 1)
    merged = reference.merged_weight(weight, block, variant)
    assert merged.dtype == dtype
    expected = (weight.double() + naive_delta(weight.float(), block, variant)).float().to(dtype)
    torch.testing.assert_close(merged, expected, atol=0, rtol=0)


def test_two_adapters_fold_in_order():
    weight = torch.randn(8, 8)
    first, second = block_for("balance", 8, 8, 4, 1), block_for("bat", 8, 8, 4, 1)
    once = weight.double() + naive_delta(weight, first, "balance")
    twice = once + naive_delta(once, second, "bat")
    x = torch.randn(3, 8)
    out = reference.forward(x, weight, None, [(first, "balance"), (second, "bat")])
    torch.testing.assert_close(out.double(), x.double() @ twice.T, atol=1e-5, rtol=1e-5)


def test_bat_unmerge_refuses_singular_block():
    block = torch.zeros(2, 4, 4)
    block[1] = -torch.eye(4)  # I + D_1 == 0
    with pytest.raises(ValueError, match=r"cannot unmerge bat block \(2, 4, 4\).*singular or ill-conditioned.*p=1"):
        reference.unmerged_weight(torch.randn(8, 8), block, "bat")


def test_bat_unmerge_refuses_ill_conditioned_block():
    block = torch.zeros(1, 3, 3)
    block[0, 0, 0] = -1 + 1e-6  # I + D has a 1e-6 singular value
    with pytest.raises(ValueError, match=r"condition number .* > 1e\+04"):
        reference.unmerged_weight(torch.randn(3, 3), block, "bat")


def test_dropout_applies_to_adapter_input_only():
    weight, block = torch.randn(6, 8), torch.randn(2, 6)
    x = torch.randn(4, 8)
    zeros = [lambda t: torch.zeros_like(t)]
    torch.testing.assert_close(reference.forward(x, weight, None, [(block, "balance")], zeros), x @ weight.T)


@pytest.mark.parametrize("variant,in_features,out_features,r,mini_r", CASES)
def test_block_variant_inverts_the_configs_block_shape(variant, in_features, out_features, r, mini_r):
    shape = MissConfig(r=r, variant=variant, mini_r=mini_r).block_shape(in_features, out_features)
    assert reference.block_variant(shape, out_features) == variant
    assert reference.block_variant(block_for(variant, in_features, out_features, r, mini_r).shape, out_features) == variant


# (operand dtypes, compute_dtype: what GEMMs and adds run in, accumulate_dtype: what merges and folds run in)
DTYPE_POLICY = [
    ((torch.bfloat16,), torch.bfloat16, torch.float32),
    ((torch.float16,), torch.float16, torch.float32),
    ((torch.float32,), torch.float32, torch.float32),
    ((torch.float64,), torch.float64, torch.float64),
    ((torch.bfloat16, torch.bfloat16), torch.bfloat16, torch.float32),
    ((torch.bfloat16, torch.float32), torch.float32, torch.float32),
    ((torch.bfloat16, torch.float16), torch.float32, torch.float32),
    ((torch.float16, torch.float64), torch.float64, torch.float64),
]


@pytest.mark.parametrize("dtypes,compute,accumulate", DTYPE_POLICY)
def test_dtype_policy_table(dtypes, compute, accumulate):
    assert reference.compute_dtype(*dtypes) == compute
    assert reference.accumulate_dtype(*dtypes) == accumulate


def test_merged_weight_accumulates_in_the_policys_dtype():
    """bf16 weight, fp64 block: the merge runs in fp64 (accumulate_dtype), then rounds once to bf16."""
    weight, block = torch.randn(8, 8).to(torch.bfloat16), torch.randn(2, 8, dtype=torch.float64)
    merged = reference.merged_weight(weight, block, "balance")
    expected = (weight.double() + naive_delta(weight, block, "balance")).to(torch.bfloat16)
    torch.testing.assert_close(merged, expected, atol=0, rtol=0)
