"""adapter_names= / adapter_ids= on a model that was never passed through stack_adapters: stacked on
first use, restacked when blocks change in place or adapters are added, refused where it cannot be
exact, never ignored (transformers' forward would swallow the keyword and run the active adapter).

apply_miss and load_adapter install the selection hooks themselves; a PEFT model built by PEFT's own
get_peft_model gets them from enable_adapter_selection (or from our apply_miss / load_adapter on it)."""

import peft
import pytest
import torch
import transformers
from helpers import DECODER, clone, input_ids, mixed, model_output, rows_alone

from miss_compile import (
    MissConfig,
    adapter_ids_for,
    apply_miss,
    miss_backend,
    set_active_adapters,
)
from miss_compile.peft_compat import named_miss_layers
from miss_compile.stacked import enable_adapter_selection, stale_stacks

ADAPTERS = {
    "a": MissConfig(r=3, init="random", target_modules="all-linear"),
    "b": MissConfig(r=6, variant="mini", mini_r=8, init="random", target_modules="all-linear"),
    "c": MissConfig(r=2, init="random", target_modules=["o_proj", "down_proj"]),
}
ARCHITECTURES = {
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
    "phi3": (transformers.Phi3ForCausalLM, transformers.Phi3Config),  # fused qkv_proj / gate_up_proj
}


def adapted(architecture, names=("a", "b"), layers=2):
    torch.manual_seed(0)
    model_class, config_class = ARCHITECTURES[architecture]
    model = model_class(config_class(**{**DECODER, "num_hidden_layers": layers, "pad_token_id": 0})).eval()
    for name in names:
        apply_miss(model, ADAPTERS[name], name)
    return model  # apply_miss installed the selection hooks


def assert_rows(model, ids, names):
    expected = rows_alone(model, ids, names)
    torch.testing.assert_close(mixed(model, ids, adapter_names=names), expected, atol=1e-5, rtol=1e-5)
    # the rows really differ: a batch served with one adapter for every row could not pass
    assert (expected[0] - expected[-1]).abs().max() > 1e-2


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_adapter_names_without_stack_adapters_follow_blocks_and_new_adapters(architecture):
    model = adapted(architecture)
    ids = input_ids(3, 6)
    assert_rows(model, ids, ["a", "b", None])  # stacked on first use
    assert not stale_stacks(model)
    q_proj = next(layer for name, layer in named_miss_layers(model).items() if "q" in name.rpartition(".")[2])
    with torch.no_grad():
        q_proj.miss_block["a"].add_(1)  # in place: same Parameter, new _version
    assert stale_stacks(model)
    assert_rows(model, ids, ["a", "b", None])  # restacked: the new numbers
    apply_miss(model, ADAPTERS["c"], "c")
    names = ["c", "a", "b", None]
    by_id = adapter_ids_for(model, names)  # restacks first: "c" is known before any call
    assert model.miss_stack_names == ["a", "b", "c"] and by_id.tolist() == [2, 0, 1, -1]  # appended: old ids hold
    assert_rows(model, input_ids(4, 5, seed=3), names)
    torch.testing.assert_close(mixed(model, input_ids(4, 5, seed=3), adapter_ids=by_id.to(torch.int32)),
                               rows_alone(model, input_ids(4, 5, seed=3), names), atol=1e-5, rtol=1e-5)


def test_blocks_replaced_by_assignment_or_load_are_restacked():
    model = adapted("llama")
    ids = input_ids(2, 5)
    assert_rows(model, ids, ["a", None])
    layer = named_miss_layers(model)["model.layers.1.mlp.up_proj"]
    with torch.no_grad():
        layer.miss_block["a"].data = torch.randn_like(layer.miss_block["a"])  # new storage, no in-place op
    assert_rows(model, ids, ["a", None])


def test_ids_built_for_a_stack_that_lost_an_adapter_are_refused():
    model = adapted("llama")
    ids = input_ids(2, 5)
    mixed(model, ids, adapter_names=["b", None])
    old_ids = adapter_ids_for(model, ["b", None])  # [1, -1] in the stack ["a", "b"]
    for layer in named_miss_layers(model).values():
        layer.remove_adapter("a")
    with pytest.raises(ValueError, match=r"the adapters changed since the stack \['a', 'b'\] was built; it is now "
                                         r"\['b'\], so adapter_ids built for the old stack would pick other adapters"):
        mixed(model, ids, adapter_ids=old_ids)
    assert_rows(model, ids, ["b", None])  # names stay unambiguous


def test_bat_adapters_are_left_out_of_the_automatic_stack_and_refused_by_name():
    model = adapted("llama", names=("a",))
    apply_miss(model, MissConfig(r=8, variant="bat", init="random", target_modules=["o_proj"]), "x")
    ids = input_ids(2, 5)
    assert_rows(model, ids, ["a", None])
    assert model.miss_stack_names == ["a"]
    with pytest.raises(ValueError, match=r"adapter_names holds \['x'\], not in the stack \['a'\]; \['x'\] are bat on "
                                         r"some layers and bat cannot share a stack"):
        mixed(model, ids, adapter_names=["x", None])


def test_a_model_without_selection_keywords_is_not_stacked_and_compiles_in_one_graph():
    model = adapted("llama", layers=1)
    ids = input_ids(2, 5)
    set_active_adapters(model, "b")
    expected = model_output(model, ids)
    assert not hasattr(model, "miss_stack_names")  # nothing stacked until a call selects
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # the hooks trace to nothing
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids, use_cache=False).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_model_serves_restacked_blocks_not_the_ones_it_was_compiled_with():
    model = adapted("llama", layers=1)
    compiled = torch.compile(model, backend=miss_backend)
    ids, names = input_ids(3, 5), ["a", "b", None]
    torch.testing.assert_close(mixed(compiled, ids, adapter_names=names), rows_alone(model, ids, names),
                               atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for layer in named_miss_layers(model).values():
            layer.miss_block["a"].mul_(-2)
    torch.testing.assert_close(mixed(compiled, ids, adapter_names=names), rows_alone(model, ids, names),
                               atol=1e-5, rtol=1e-5)
    apply_miss(model, ADAPTERS["c"], "c")
    names = ["c", None, "a"]
    torch.testing.assert_close(mixed(compiled, ids, adapter_names=names), rows_alone(model, ids, names),
                               atol=1e-5, rtol=1e-5)


def test_peft_model_refuses_adapter_names_that_peft_would_ignore():
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER)).eval()
    theirs = peft.get_peft_model(clone(base), ADAPTERS["a"].to_peft(), "a")
    theirs.add_adapter("b", ADAPTERS["b"].to_peft())
    theirs.eval()
    ids = input_ids(2, 5)
    # what PEFT 0.21 does: drops the keyword, and every row runs the active adapter ("a")
    torch.testing.assert_close(mixed(theirs, ids, adapter_names=["b", None]), model_output(theirs, ids))
    enable_adapter_selection(theirs)
    with pytest.raises(ValueError, match=r"PEFT ignores adapter_names for MiSS adapters, so every row would run the "
                                         r"active adapter. Serve mixed batches from miss_compile.stack_adapters"):
        mixed(theirs, ids, adapter_names=["b", None])
    torch.testing.assert_close(mixed(theirs, ids), model_output(theirs, ids))  # without the keyword: as before
