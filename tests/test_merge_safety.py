"""Merging never changes what it must not: a weight other modules read too (tied lm_head and input
embedding, two layers over one Parameter or one memory), nor the base output while adapters are
disabled. Numbers against eager unmerged forwards and PEFT; shared weights compared bit for bit."""

import copy

import peft
import pytest
import torch
import transformers
from cases import TIED, TIED_VARIANTS
from helpers import DECODER, embedding_weight, head, input_ids, model_output, randomize_blocks, tied_pair
from torch import nn

from miss_compile import (
    MissConfig,
    apply_miss,
    enable_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    unmerge_adapters,
)
from miss_compile.peft_compat import from_peft, named_miss_layers, shared_base_weights

TOLERANCE = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", list(TIED_VARIANTS))
@pytest.mark.parametrize("model_name", list(TIED))
def test_merge_leaves_a_tied_embedding_bit_identical_and_unmerge_reties(model_name, variant, dtype):
    base, ours = tied_pair(model_name, variant, dtype)
    ids = input_ids()
    unmerged_out = model_output(ours, ids)
    embedding = embedding_weight(ours, model_name)
    assert shared_base_weights(ours).keys() == {"lm_head"}

    merge_adapters(ours)
    assert torch.equal(embedding, embedding_weight(base, model_name))  # the embedding read no W + dW
    assert head(ours).base_layer.weight is not embedding  # the head merged into its own copy
    torch.testing.assert_close(model_output(ours, ids), unmerged_out, **TOLERANCE[dtype])

    unmerge_adapters(ours)
    assert head(ours).base_layer.weight is embedding_weight(ours, model_name)  # tied again, never rounded
    assert torch.equal(embedding, embedding_weight(base, model_name))
    torch.testing.assert_close(model_output(ours, ids), unmerged_out, **TOLERANCE[dtype])


def test_a_model_cast_while_merged_reties_in_the_new_dtype():
    """model.to() converts the shared Parameter in place, so the kept one still is the embedding's."""
    _, ours = tied_pair("llama")
    merge_adapters(ours)
    ours.to(torch.bfloat16)
    unmerge_adapters(ours)
    assert head(ours).base_layer.weight is embedding_weight(ours, "llama")
    assert embedding_weight(ours, "llama").dtype == torch.bfloat16


def test_apply_on_a_tied_head_adapts_the_head_only():
    """Before any merge: the head carries the adapter, the embedding reads its plain weight (as PEFT)."""
    base, ours = tied_pair("llama")
    theirs = peft.get_peft_model(copy.deepcopy(base), MissConfig(r=3, init="random", target_modules=["lm_head", "q_proj"]).to_peft())
    for name, layer in named_miss_layers(ours).items():
        named_miss_layers(theirs)[name].miss_block["default"].data.copy_(layer.miss_block["default"])
    ids = input_ids()
    torch.testing.assert_close(model_output(ours, ids), model_output(theirs, ids), **TOLERANCE[torch.float32])
    assert torch.equal(embedding_weight(ours, "llama"), embedding_weight(base, "llama"))
    assert not torch.allclose(model_output(ours, ids), model_output(base, ids), atol=1e-3)


def test_layer_merge_unties_what_apply_miss_saw_shared():
    """MissLinear.merge called directly (no model at hand) still writes into its own copy."""
    base, ours = tied_pair("gpt2")
    assert head(ours).base_weight_shared
    head(ours).merge()
    assert torch.equal(embedding_weight(ours, "gpt2"), embedding_weight(base, "gpt2"))
    head(ours).unmerge()
    assert head(ours).base_layer.weight is embedding_weight(ours, "gpt2")


def test_merge_on_a_peft_model_leaves_the_tied_embedding():
    """PEFT's own merge writes W + dW into the shared Parameter (it warns); ours unties first."""
    base, _ = tied_pair("llama")
    config = MissConfig(r=3, init="random", target_modules=["lm_head", "q_proj"])
    theirs = peft.get_peft_model(copy.deepcopy(base), config.to_peft())
    randomize_blocks(theirs)
    ids = input_ids()
    unmerged_out = model_output(theirs, ids)
    merge_adapters(theirs)
    assert torch.equal(embedding_weight(theirs, "llama"), embedding_weight(base, "llama"))
    torch.testing.assert_close(model_output(theirs, ids), unmerged_out, **TOLERANCE[torch.float32])
    unmerge_adapters(theirs)
    assert head(theirs).get_base_layer().weight is embedding_weight(theirs, "llama")
    assert not head(theirs).merged
    assert torch.equal(embedding_weight(theirs, "llama"), embedding_weight(base, "llama"))
    torch.testing.assert_close(model_output(theirs, ids), unmerged_out, **TOLERANCE[torch.float32])


def test_a_peft_model_merged_tied_then_converted_reties_bit_for_bit():
    """from_peft carries the kept shared weight: the converted copy unmerges by re-tying, no inverse."""
    base, _ = tied_pair("llama")
    config = MissConfig(r=3, init="random", target_modules=["lm_head", "q_proj"])
    theirs = peft.get_peft_model(copy.deepcopy(base), config.to_peft())
    randomize_blocks(theirs)
    merge_adapters(theirs)
    ours = from_peft(theirs)
    unmerge_adapters(ours)
    assert ours.lm_head.base_weight() is ours.model.embed_tokens.weight
    assert torch.equal(ours.model.embed_tokens.weight, embedding_weight(base, "llama"))


def test_a_converted_peft_copy_merged_layer_by_layer_leaves_the_tied_embedding():
    """from_peft marks the copy's shared weights, so MissLinear.merge() called directly unties too."""
    base, _ = tied_pair("llama")
    config = MissConfig(r=3, init="random", target_modules=["lm_head", "q_proj"])
    theirs = peft.get_peft_model(copy.deepcopy(base), config.to_peft())
    randomize_blocks(theirs)
    ours = from_peft(theirs)
    ids = input_ids()
    expected = model_output(ours, ids)
    ours.lm_head.merge()
    assert torch.equal(ours.model.embed_tokens.weight, embedding_weight(base, "llama"))
    torch.testing.assert_close(model_output(ours, ids), expected, **TOLERANCE[torch.float32])


class TwoReaders(nn.Module):
    """`first` is adapted; `second` reads the same weight (one Parameter, or one memory)."""

    def __init__(self, how: str):
        super().__init__()
        self.first, self.second, self.third = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(8, 8)
        if how == "same-parameter":
            self.second.weight = self.first.weight
        elif how == "same-memory":
            self.second.weight = nn.Parameter(self.first.weight.data)
        elif how == "disjoint-views":  # one flat buffer, no overlap: nothing is shared
            flat = torch.randn(2 * 16 * 8)
            self.first.weight = nn.Parameter(flat[:128].view(8, 16))
            self.second.weight = nn.Parameter(flat[128:].view(8, 16))

    def forward(self, x):
        return self.third(self.first(x)) + self.second(x).sum(-1, keepdim=True)


@pytest.mark.parametrize("how", ["same-parameter", "same-memory", "disjoint-views"])
def test_merge_never_writes_into_a_weight_another_layer_reads(how):
    torch.manual_seed(0)
    model = TwoReaders(how).eval()
    second = model.second.weight.detach().clone()
    apply_miss(model, MissConfig(r=4, init="random", target_modules=["first", "third"]))
    x = torch.randn(3, 16)
    unmerged_out = model(x)
    weight_before = model.first.base_layer.weight
    merge_adapters(model)
    assert torch.equal(model.second.weight, second)
    torch.testing.assert_close(model(x), unmerged_out, **TOLERANCE[torch.float32])
    assert (model.first.base_layer.weight is weight_before) == (how == "disjoint-views")  # untied only if shared
    unmerge_adapters(model)
    assert model.first.base_layer.weight is weight_before
    assert torch.equal(model.second.weight, second)


def test_a_merge_failing_part_way_reties_the_layers_it_had_untied():
    torch.manual_seed(0)
    model = TwoReaders("same-parameter").eval()
    apply_miss(model, MissConfig(r=8, variant="bat", target_modules=["first", "third"]))
    second = model.second.weight.detach().clone()
    with torch.no_grad():
        model.third.miss_block["default"].fill_(3e38)  # finite block, but W @ D + D + W overflows to Inf
    with pytest.raises(ValueError, match=r"layer 'third'.*NaN or Inf in the weight.*no layer was merged"):
        merge_adapters(model)
    assert model.first.base_layer.weight is model.second.weight
    assert torch.equal(model.second.weight, second)
    assert not model.first.merged


def test_a_failed_second_merge_keeps_the_first_one_in_the_untied_copy():
    torch.manual_seed(0)
    model = TwoReaders("same-parameter").eval()
    for name in ("a", "b"):
        apply_miss(model, MissConfig(r=8, variant="bat", init="random", target_modules=["first", "third"]), name)
    second = model.second.weight.detach().clone()
    x = torch.randn(3, 16)
    merge_adapters(model, ["a"])
    merged_a = model.first.base_layer.weight.detach().clone()
    with torch.no_grad():
        model.third.miss_block["b"].fill_(3e38)  # W + dW overflows on the second layer only
    with pytest.raises(ValueError, match=r"layer 'third'.*no layer was merged"):
        merge_adapters(model, ["b"])
    assert torch.equal(model.first.base_layer.weight, merged_a) and model.first.merged_adapters == ["a"]
    assert model.first.base_layer.weight is not model.second.weight
    unmerge_adapters(model)
    assert model.first.base_layer.weight is model.second.weight
    assert torch.equal(model.second.weight, second)
    assert model(x).isfinite().all()


def test_save_and_load_after_a_tied_merge():
    """The blocks saved while merged are the trained ones; a fresh tied model loads them and agrees."""
    base, ours = tied_pair("llama")
    ids = input_ids()
    unmerged_out = model_output(ours, ids)
    merge_adapters(ours)
    save_adapter(ours, _tmp := __import__("tempfile").mkdtemp())
    fresh = copy.deepcopy(base)
    load_adapter(fresh, _tmp)
    torch.testing.assert_close(model_output(fresh, ids), unmerged_out, **TOLERANCE[torch.float32])
    merge_adapters(fresh)
    assert torch.equal(embedding_weight(fresh, "llama"), embedding_weight(base, "llama"))
    torch.testing.assert_close(model_output(fresh, ids), unmerged_out, **TOLERANCE[torch.float32])


# --- merging while adapters are disabled (PEFT: the merge happens; a forward while disabled unmerges)


def peft_pair(variant):
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER)).eval()
    config = MissConfig(target_modules="all-linear", **TIED_VARIANTS[variant])
    ours = apply_miss(copy.deepcopy(base), config)
    randomize_blocks(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), config.to_peft())
    for name, layer in named_miss_layers(ours).items():
        named_miss_layers(theirs)[name].miss_block["default"].data.copy_(layer.miss_block["default"])
    return base, ours, theirs.eval()


@pytest.mark.parametrize("variant", list(TIED_VARIANTS))
def test_merge_while_disabled_gives_the_base_output_then_the_adapted_one_as_peft(variant):
    base, ours, theirs = peft_pair(variant)
    ids = input_ids()
    tolerance = TOLERANCE[torch.float32]
    enable_adapters(ours, False)
    theirs.base_model.disable_adapter_layers()
    merge_adapters(ours)
    theirs.merge_adapter()
    assert all(layer.merged for layer in named_miss_layers(ours).values())

    ours_disabled = model_output(ours, ids)
    torch.testing.assert_close(ours_disabled, model_output(theirs, ids), **tolerance)
    torch.testing.assert_close(ours_disabled, model_output(base, ids), **tolerance)

    enable_adapters(ours, True)
    theirs.base_model.enable_adapter_layers()
    ours_enabled = model_output(ours, ids)
    torch.testing.assert_close(ours_enabled, model_output(theirs, ids), **tolerance)
    assert not torch.allclose(ours_enabled, ours_disabled, atol=1e-3)


def test_merge_while_disabled_then_enable_without_a_forward_keeps_the_merge():
    _, ours, theirs = peft_pair("balance")
    ids = input_ids()
    adapted = model_output(ours, ids)
    enable_adapters(ours, False)
    merge_adapters(ours)
    enable_adapters(ours, True)
    assert all(layer.merged for layer in named_miss_layers(ours).values())
    torch.testing.assert_close(model_output(ours, ids), adapted, **TOLERANCE[torch.float32])


def test_layer_merged_while_disabled_runs_its_base_path_unmerged():
    torch.manual_seed(0)
    linear = nn.Linear(24, 12)
    layer = apply_miss(nn.Sequential(copy.deepcopy(linear)), MissConfig(r=4, init="random", target_modules=["0"]))[0]
    x = torch.randn(5, 24)
    layer.enable_adapters(False)
    layer.merge()
    torch.testing.assert_close(layer(x), linear(x), **TOLERANCE[torch.float32])
    assert not layer.merged


def test_compiled_layer_merged_while_disabled_unmerges_outside_the_graph():
    """The unmerge in forward runs eagerly (a graph break), then the compiled forward gives base, then adapted."""
    from miss_compile import miss_backend

    torch.manual_seed(0)
    linear = nn.Linear(24, 12)
    model = apply_miss(nn.Sequential(copy.deepcopy(linear)), MissConfig(r=4, init="random", target_modules=["0"]))
    x = torch.randn(5, 24)
    with torch.no_grad():
        adapted = model(x)
        compiled = torch.compile(model, backend=miss_backend)
        enable_adapters(model, False)
        merge_adapters(model)
        torch.testing.assert_close(compiled(x), linear(x), **TOLERANCE[torch.float32])
        enable_adapters(model, True)
        torch.testing.assert_close(compiled(x), adapted, **TOLERANCE[torch.float32])
