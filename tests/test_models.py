"""Whole tiny transformers models: ours against PEFT (Linear) and the reference (GPT-2's Conv1D)."""

import peft
import pytest
import torch
from cases import CONFIGS, PEFT_CASES, params
from helpers import build, clone, copy_blocks, input_ids, model_output, randomize_blocks
from torch import nn
from transformers.pytorch_utils import Conv1D

from miss_compile import (
    MissConfig,
    adapters_disabled,
    apply_miss,
    merge_adapters,
    reference,
    set_active_adapters,
    unmerge_adapters,
)
from miss_compile.layer import MissLinear
from miss_compile.peft_compat import named_miss_layers


@pytest.mark.parametrize("model_name, kwargs", params(PEFT_CASES))
def test_model_matches_peft(model_name, kwargs):
    base = build(model_name)
    config = MissConfig(**kwargs)
    ours = apply_miss(clone(base), config)
    theirs = peft.get_peft_model(clone(base), config.to_peft()).eval()
    assert named_miss_layers(ours).keys() == named_miss_layers(theirs).keys()
    randomize_blocks(ours)
    copy_blocks(ours, theirs)
    for ids in (input_ids(2, 7), input_ids(1, 1)):
        expected = model_output(theirs, ids)
        torch.testing.assert_close(model_output(ours, ids), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model_output(base, ids), expected, atol=1e-3)
    merge_adapters(ours)
    merge_adapters(theirs)
    ids = input_ids(3, 5)
    torch.testing.assert_close(model_output(ours, ids), model_output(theirs, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_bf16_model_with_fp32_adapters_matches_peft(variant):
    base = build("llama", dtype=torch.bfloat16)
    ours = apply_miss(clone(base), CONFIGS[variant])
    theirs = peft.get_peft_model(clone(base), CONFIGS[variant].to_peft()).eval()
    randomize_blocks(ours)
    copy_blocks(ours, theirs)
    assert ours.model.layers[0].mlp.up_proj.miss_block["default"].dtype == torch.float32
    ids = input_ids()
    out, expected = model_output(ours, ids), model_output(theirs, ids)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)


def test_all_linear_leaves_out_the_output_head():
    model = apply_miss(build("llama"), CONFIGS["balance"])
    assert isinstance(model.lm_head, nn.Linear)
    assert len(named_miss_layers(model)) == 2 * 7


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_gpt2_conv1d_matches_reference(variant):
    base = build("gpt2")
    ours = apply_miss(clone(base), CONFIGS[variant])
    layers = named_miss_layers(ours)
    assert {name.rsplit(".", 1)[-1] for name in layers} == {"c_attn", "c_proj", "c_fc"}
    assert all(isinstance(layer.base_layer, Conv1D) for layer in layers.values())
    randomize_blocks(ours)
    # The oracle: the base model with every Conv1D weight replaced by the reference's merged weight.
    expected_model = clone(base)
    with torch.no_grad():
        for name, layer in layers.items():
            conv = expected_model.get_submodule(name)
            merged = reference.merged_weight(conv.weight.t(), layer.miss_block["default"], variant)
            conv.weight.copy_(merged.t())
    ids = input_ids()
    expected = model_output(expected_model, ids)
    torch.testing.assert_close(model_output(ours, ids), expected, atol=1e-5, rtol=1e-5)
    merge_adapters(ours)
    torch.testing.assert_close(ours.transformer.h[0].attn.c_attn.base_layer.weight,
                               expected_model.transformer.h[0].attn.c_attn.weight, atol=1e-6, rtol=1e-6)
    unmerge_adapters(ours)
    torch.testing.assert_close(ours.transformer.h[0].attn.c_attn.base_layer.weight,
                               base.transformer.h[0].attn.c_attn.weight, atol=1e-5, rtol=1e-5)


def two_adapter_llama():
    base = build("llama")
    model = apply_miss(clone(base), CONFIGS["balance"], "first")
    apply_miss(model, CONFIGS["bat"], "second")
    randomize_blocks(model, "first", seed=3)
    randomize_blocks(model, "second", seed=4)
    return base, model


def folded_copy(base, model, adapters):
    """The base model with each adapted weight replaced by the reference's fold of `adapters`."""
    expected = clone(base)
    with torch.no_grad():
        for name, layer in named_miss_layers(model).items():
            linear = expected.get_submodule(name)
            weight = linear.weight
            for adapter in adapters:
                weight = reference.merged_weight(weight, layer.miss_block[adapter], layer.miss_variant[adapter])
            linear.weight.copy_(weight)
    return expected


def test_two_variants_on_one_layer_and_switching():
    base, model = two_adapter_llama()
    ids = input_ids()
    assert model.model.layers[0].self_attn.q_proj.active_adapters == ["first"]
    torch.testing.assert_close(model_output(model, ids), model_output(folded_copy(base, model, ["first"]), ids))
    set_active_adapters(model, "second")
    torch.testing.assert_close(model_output(model, ids), model_output(folded_copy(base, model, ["second"]), ids))
    set_active_adapters(model, ["first", "second"])
    both = model_output(folded_copy(base, model, ["first", "second"]), ids)
    torch.testing.assert_close(model_output(model, ids), both, atol=1e-5, rtol=1e-5)
    merge_adapters(model)
    torch.testing.assert_close(model_output(model, ids), both, atol=1e-5, rtol=1e-5)
    with adapters_disabled(model):  # unmerges first: disabled means the base model exactly
        torch.testing.assert_close(model_output(model, ids), model_output(base, ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model_output(model, ids), both, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['third'\]; the model has \['first', 'second'\]"):
        set_active_adapters(model, "third")


def test_only_active_blocks_train():
    _, model = two_adapter_llama()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith("miss_block.first") for name in trainable)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(input_ids=input_ids(), labels=input_ids()).loss.backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == trainable


def test_merge_refuses_nan_and_leaves_weights():
    _, model = two_adapter_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.miss_block["first"][0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer 'model.layers.1.mlp.up_proj': adapter 'first' block \(3, 48\) holds NaN"):
        merge_adapters(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if "miss_block" not in k)
    assert not any(layer.merged for layer in named_miss_layers(model).values())


def test_unmerge_refuses_ill_conditioned_bat_in_any_layer():
    _, model = two_adapter_llama()
    set_active_adapters(model, "second")
    merge_adapters(model)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.miss_block["second"][2] = -torch.eye(8)
    with pytest.raises(ValueError, match=r"layer 'model.layers.1.mlp.down_proj', adapter 'second': cannot unmerge bat"):
        unmerge_adapters(model)
    for key, value in model.state_dict().items():
        if "miss_block" not in key:
            assert torch.equal(value, merged[key]), key  # all layers still merged, none half-done


def test_failed_apply_leaves_model_as_it_was():
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = MissConfig(r=2, variant="mini", mini_r=32, target_modules="all-linear")
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.k_proj' \(in_features=32, out_features=16\)"):
        apply_miss(model, config)
    assert model.state_dict().keys() == before.keys()
    assert not any(isinstance(m, MissLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_second_adapter_name_clash_is_an_error():
    model = apply_miss(build("llama"), CONFIGS["balance"])
    with pytest.raises(ValueError, match=r"already has an adapter named 'default'"):
        apply_miss(model, CONFIGS["balance"])


def test_live_peft_model_through_our_api():
    base = build("llama")
    theirs = peft.get_peft_model(clone(base), CONFIGS["balance"].to_peft())
    apply_miss(theirs, MissConfig(r=4, target_modules=["q_proj"]), "extra")
    assert "extra" in theirs.base_model.model.model.layers[0].self_attn.q_proj.miss_block
    with pytest.raises(ValueError, match=r"PEFT MissLinear whose adapters are 'balance'.*'bat' adapter would be wrong"):
        apply_miss(theirs, MissConfig(r=8, variant="bat", target_modules=["q_proj"]), "other")
    randomize_blocks(theirs)
    ids = input_ids()
    theirs.eval()
    unmerged = model_output(theirs, ids)
    merge_adapters(theirs)
    torch.testing.assert_close(model_output(theirs, ids), unmerged, atol=1e-5, rtol=1e-5)
    unmerge_adapters(theirs)
    set_active_adapters(theirs, "extra")
    with adapters_disabled(theirs):
        torch.testing.assert_close(model_output(theirs, ids), model_output(base, ids))


def test_new_layers_follow_the_models_training_mode():
    model = apply_miss(build("llama"), MissConfig(r=4, dropout=0.5, target_modules=["q_proj"]))
    assert not any(module.training for module in model.modules())
    ids = input_ids()
    torch.testing.assert_close(model_output(model, ids), model_output(model, ids))
