"""Many adapters in one batch: each row of a mixed batch equals that row run alone with its adapter
(eager, PEFT, miss_backend, onnxruntime), the stacking rules, and the op against the reference."""

import onnx
import peft
import pytest
import torch
import transformers
from helpers import DECODER, build, clone, input_ids, mixed, model_output, rows_alone
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck

from miss_compile import (
    NO_ADAPTER,
    MissConfig,
    adapter_ids_for,
    apply_miss,
    make_backend,
    reference,
    set_active_adapters,
    stack_adapters,
)
from miss_compile.export import export_onnx, load_session, write_onnx_stack
from miss_compile.ops import stacked_linear
from miss_compile.peft_compat import named_miss_layers
from miss_compile.stacked import stack_blocks

# Three adapters: ranks 3, 6 (mini) and 2 (q/v only): stacks of rank lcm = 6, zeros where absent.
ADAPTERS = {
    "a": MissConfig(r=3, target_modules="all-linear"),
    "b": MissConfig(r=6, variant="mini", mini_r=8, target_modules="all-linear"),
    "c": MissConfig(r=2, target_modules=["q_proj", "v_proj"]),
}
MIX = ["b", None, "a", "c", "b"]


@torch.no_grad()
def randomize_all(model, seed=3):
    generator = torch.Generator().manual_seed(seed)
    for layer in named_miss_layers(model).values():
        for block in layer.miss_block.values():
            block.copy_(torch.randn(block.shape, generator=generator) * 0.1)


def adapted(names=("a", "b", "c"), layers=2):
    torch.manual_seed(0)
    model = build("llama") if layers == 2 else transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**DECODER, "num_hidden_layers": layers})).eval()
    for name in names:
        apply_miss(model, ADAPTERS[name], name)
    randomize_all(model)
    return model


@pytest.fixture(scope="module")
def stacked():
    model = stack_adapters(adapted())
    ids = input_ids(len(MIX), 7)
    return model, ids, rows_alone(model, ids, MIX)


# --- the stacking rules


def test_rank_expansion_is_exact_and_zero_padding_is_not():
    """D_R[j] = D_r[j % r] gives the rank-r adapter for any in_features when r | R; [D_r; 0] does not."""
    torch.manual_seed(0)
    for in_features, r, rank in [(13, 2, 6), (32, 3, 6), (7, 3, 12)]:
        x, block = torch.randn(4, in_features), torch.randn(r, 5)
        expected = reference.chunk_sum(x, r) @ block
        stack = stack_blocks("layer", 5, [("d", block, "balance")], rank)
        assert stack.shape == (2, rank, 5) and not stack[1].any()  # the last block is "no adapter"
        torch.testing.assert_close(reference.chunk_sum(x, rank) @ stack[0], expected, atol=1e-5, rtol=1e-5)
        padded = torch.cat([block, torch.zeros(rank - r, 5)])
        assert (reference.chunk_sum(x, rank) @ padded - expected).abs().max() > 0.1


def test_mini_and_balance_share_a_stack_at_the_lcm_rank():
    mini, balance = torch.randn(3, 4), torch.randn(2, 8)
    stack = stack_blocks("layer", 8, [("m", mini, "mini"), ("absent", None, ""), ("b", balance, "balance")])
    assert stack.shape == (4, 6, 8)
    torch.testing.assert_close(stack[0], mini.repeat(2, 2))
    torch.testing.assert_close(stack[2], balance.repeat(3, 1))
    assert not stack[1].any() and not stack[3].any()


@pytest.mark.parametrize("blocks,rank,message", [
    ([("bat", torch.randn(2, 4, 4), "bat")], None, r"adapter\(s\) \['bat'\] are bat; bat's update depends on the base"),
    ([("a", torch.randn(3, 8), "balance"), ("b", torch.randn(2, 8), "balance")], 4,
     r"stack rank 4 is not a multiple of the ranks \{'a': 3\}.*Use rank=6"),
    ([("a", torch.randn(3, 8), "balance"), ("b", torch.randn(3, 8).half(), "balance")], None,
     r"blocks of different dtypes"),
    ([("a", None, "")], None, r"none of the adapters \['a'\] is on it"),
], ids=["bat", "rank-not-a-multiple", "dtypes", "empty"])
def test_stacks_that_would_be_wrong_are_refused(blocks, rank, message):
    with pytest.raises(ValueError, match=message):
        stack_blocks("model.layers.0.mlp.up_proj", 8, blocks, rank)


def test_bat_model_refuses_to_stack_and_stays_as_it_was():
    model = build("llama")
    apply_miss(model, MissConfig(r=8, variant="bat", target_modules="all-linear"), "bat")
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.q_proj': adapter\(s\) \['bat'\] are bat"):
        stack_adapters(model)
    assert all(layer.miss_stack is None for layer in named_miss_layers(model).values())


# --- the op against the reference


@pytest.mark.parametrize("lead,in_features", [((4, 3), 13), ((3,), 12), ((2, 1, 5), 9)], ids=["3d-padded", "2d", "4d"])
def test_op_rows_match_reference_values_and_input_gradients(lead, in_features):
    torch.manual_seed(0)
    blocks = [torch.randn(3, 6) * 0.1, torch.randn(3, 6) * 0.1]
    stack = stack_blocks("layer", 6, [("p", blocks[0], "balance"), ("q", blocks[1], "balance")])
    x = torch.randn(*lead, in_features, requires_grad=True)
    weight, bias = torch.randn(6, in_features), torch.randn(6)
    ids = torch.tensor([1, NO_ADAPTER, 0, 1][: lead[0]])
    out = stacked_linear(x, ids, weight, bias, stack)
    grad = torch.randn_like(out)
    (grad_x,) = torch.autograd.grad(out, x, grad)
    for row, adapter in enumerate(ids.tolist()):
        x_row = x[row:row + 1].detach().requires_grad_()
        terms = [] if adapter == NO_ADAPTER else [(blocks[adapter], "balance")]
        expected = reference.forward(x_row, weight, bias, terms)
        torch.testing.assert_close(out[row:row + 1], expected, atol=1e-5, rtol=1e-5)
        (want,) = torch.autograd.grad(expected, x_row, grad[row:row + 1])
        torch.testing.assert_close(grad_x[row:row + 1], want, atol=1e-5, rtol=1e-5)


def test_op_bf16_input_with_fp32_stack_follows_peft_rounding():
    torch.manual_seed(0)
    block = torch.randn(4, 8) * 0.1
    stack = stack_blocks("layer", 8, [("p", block, "balance")])
    x, weight = torch.randn(3, 5, 16).bfloat16(), torch.randn(8, 16).bfloat16()
    out = stacked_linear(x, torch.tensor([0, -1, 0]), weight, None, stack)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out[0], reference.forward(x[0], weight, None, [(block, "balance")]), atol=0, rtol=0)
    torch.testing.assert_close(out[1], reference.forward(x[1], weight, None, []), atol=0, rtol=0)


def test_op_opcheck_and_refusals():
    torch.manual_seed(0)
    stack = torch.randn(3, 4, 6)
    x, weight, ids = torch.randn(2, 3, 8), torch.randn(6, 8), torch.tensor([0, 2])
    torch.library.opcheck(stacked_linear, (x, ids, weight, None, stack))
    with pytest.raises(IndexError, match=r"adapter_ids \[0, 3\] out of range for a stack of 3 blocks"):
        stacked_linear(x, torch.tensor([0, 3]), weight, None, stack)
    with pytest.raises(RuntimeError, match=r"adapter_ids \(3,\) must hold one id per batch row of x \(2, 3, 8\)"):
        stacked_linear(x, torch.tensor([0, 1, 2]), weight, None, stack)
    with pytest.raises(RuntimeError, match=r"adapter_ids must be int64 or int32, got torch.bool"):
        stacked_linear(x, torch.tensor([True, False]), weight, None, stack)
    empty = stacked_linear(x[:0], ids[:0], weight, None, stack)
    assert empty.shape == (0, 3, 6)
    with pytest.raises(RuntimeError, match=r"\['stack'\] require grad, but adapter stacks are for inference.*"
                                           r"torch.no_grad\(\) or torch.inference_mode\(\)"):
        stacked_linear(x, ids, weight, None, stack.requires_grad_())


# --- models: eager


def test_mixed_batch_equals_each_row_alone(stacked):
    model, ids, expected = stacked
    torch.testing.assert_close(mixed(model, ids, adapter_names=MIX), expected, atol=1e-5, rtol=1e-5)
    by_id = adapter_ids_for(model, MIX)
    assert by_id.tolist() == [1, NO_ADAPTER, 0, 2, 1]
    torch.testing.assert_close(mixed(model, ids, adapter_ids=by_id), expected, atol=1e-5, rtol=1e-5)
    # no selection: the active adapter, as before stacking (the ids of the last call are not kept)
    set_active_adapters(model, "a")
    torch.testing.assert_close(model_output(model, ids[2:3]), expected[2:3], atol=1e-5, rtol=1e-5)


def test_selection_errors_are_named(stacked):
    model, ids, _ = stacked
    with pytest.raises(ValueError, match=r"adapter_names holds \['zz'\], not in the stack \['a', 'b', 'c'\]"):
        mixed(model, ids, adapter_names=["zz"] * len(MIX))
    with pytest.raises(ValueError, match="pass adapter_names or adapter_ids, not both"):
        mixed(model, ids, adapter_names=MIX, adapter_ids=torch.zeros(len(MIX), dtype=torch.int64))
    with pytest.raises(ValueError, match="has no adapter stacks; call miss_compile.stack_adapters"):
        adapter_ids_for(adapted(["a"]), ["a"])
    with pytest.raises(TypeError, match=r"adapter_names='a' is one string; pass one name per batch row"):
        adapter_ids_for(model, "a")


@pytest.mark.parametrize("ids,error,message", [
    ([0, 1, 0, 1, 0], TypeError, r"adapter_ids must be a tensor, got list; build it with miss_compile.adapter_ids_for"),
    (torch.ones(5, dtype=torch.bool), ValueError, r"1-D int64 \(or int32\) tensor, one id per batch row; got torch.bool"),
    (torch.ones(5, dtype=torch.uint8), ValueError, r"got torch.uint8 of shape \(5,\)"),
    (torch.tensor([0, -2, 0, 0, 0]), ValueError, r"ids run from 0 to 2 over the stack \['a', 'b', 'c'\], and -1"),
    (torch.tensor([0, 3, 0, 0, 0]), ValueError, r"adapter_ids \[0, 3, 0, 0, 0\]: ids run from 0 to 2"),
    (torch.tensor([0, 1]), ValueError, r"adapter_ids hold 2 ids, but the input \(5, 7, 32\) of this layer .* has batch 5"),
], ids=["list", "bool", "uint8", "minus-two", "past-the-end", "length"])
def test_ids_a_stacked_forward_cannot_serve_exactly_are_refused(stacked, ids, error, message):
    model, input_ids_, _ = stacked
    with pytest.raises(error, match=message):
        mixed(model, input_ids_, adapter_ids=ids)
    assert all(layer.adapter_ids is None for layer in named_miss_layers(model).values())  # cleared after errors too


def test_ids_do_not_outlive_the_call_that_set_them(stacked):
    """A later call of a submodule alone (model.model) runs the active adapter, not the last call's mix."""
    model, ids, expected = stacked
    set_active_adapters(model, "a")
    mixed(model, ids, adapter_names=MIX)
    assert all(layer.adapter_ids is None for layer in named_miss_layers(model).values())
    with torch.no_grad():
        hidden = model.model(input_ids=ids[2:3], use_cache=False).last_hidden_state
        torch.testing.assert_close(model.lm_head(hidden), expected[2:3], atol=1e-5, rtol=1e-5)


def test_a_layer_without_any_stacked_adapter_gives_the_base_output_for_every_id():
    """Stacking only "c" (q/v): the other layers hold zero stacks, where they used to refuse."""
    model = stack_adapters(adapted(["a", "c"]), ["c"])
    ids = input_ids(3, 5)
    layers = named_miss_layers(model)
    assert not layers["model.layers.0.mlp.up_proj"].miss_stack.any()
    names = ["c", None, "c"]
    torch.testing.assert_close(mixed(model, ids, adapter_names=names), rows_alone(model, ids, names),
                               atol=1e-5, rtol=1e-5)


def test_a_layer_adapted_after_stacking_is_restacked_not_served_its_active_adapter():
    model = stack_adapters(adapted(["c"]))  # q_proj, v_proj
    apply_miss(model, MissConfig(r=2, target_modules=["up_proj"]), "late")
    randomize_all(model, seed=4)
    names = ["late", "c", None]
    ids = input_ids(len(names), 5)
    torch.testing.assert_close(mixed(model, ids, adapter_names=names), rows_alone(model, ids, names),
                               atol=1e-5, rtol=1e-5)
    assert model.miss_stack_names == ["c", "late"]  # appended: ids built for ["c"] keep their meaning
    with pytest.raises(ValueError, match=r"adapter_names holds \['a'\], not in the stack \['c', 'late'\]; the model "
                                         r"has no such adapter"):
        mixed(model, ids, adapter_names=["a", None, None])
    with pytest.raises(ValueError, match=r"stack rank 0 must be a positive int"):
        stack_adapters(model, rank=0)


def test_peft_model_with_several_adapters_matches_peft_row_by_row():
    base = build("llama")
    theirs = peft.get_peft_model(clone(base), MissConfig(r=3, target_modules="all-linear").to_peft(), "a")
    theirs.add_adapter("b", MissConfig(r=6, target_modules="all-linear").to_peft())
    randomize_all(theirs)
    theirs.eval()
    served = stack_adapters(theirs)
    assert served is not theirs and not isinstance(served, peft.PeftModel)  # a converted copy
    names = ["b", "a", None, "b"]
    ids = input_ids(len(names), 6, seed=5)
    expected = []
    with torch.no_grad():
        for row, name in enumerate(names):
            if name is None:
                with theirs.disable_adapter():
                    expected.append(model_output(theirs, ids[row:row + 1]))
            else:
                theirs.set_adapter(name)
                expected.append(model_output(theirs, ids[row:row + 1]))
    torch.testing.assert_close(mixed(served, ids, adapter_names=names), torch.cat(expected), atol=1e-5, rtol=1e-5)


# --- compiled and exported


@pytest.mark.slow
def test_compiled_mixed_batches_equal_rows_and_compile_once():
    model = stack_adapters(adapted(layers=1))  # one decoder layer: 7 adapted Linears
    batches = [(MIX, input_ids(len(MIX), 7))] + [(names, input_ids(len(names), 5, seed=len(names))) for names in
                                                  (["c", "c", None], ["a", "b", "c", None, "a", "b"], ["b", "a"])]
    expected = [rows_alone(model, ids, names) for names, ids in batches]
    backend = make_backend()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    outputs, codes = run_and_get_code(lambda: [mixed(compiled, ids, adapter_names=names) for names, ids in batches])
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # one compile for every batch size and mix; each of the 7 Linears gathers its rows' blocks by
    # id and runs one batched GEMM, no pass per adapter
    assert len(codes) == 1
    FileCheck().check_count("extern_kernels.bmm(", 7, exactly=True).run(codes[0])
    reports = [report for report in backend.graph_pass.reports if report.rewritten]
    assert reports and all([(r.variant, r.adapters) for r in report.rewritten] == [("stacked", 4)] * 7
                           for report in reports)


@pytest.fixture(scope="module")
def stacked_export(stacked, tmp_path_factory):
    model, _, _ = stacked
    path = tmp_path_factory.mktemp("stacked") / "stacked.onnx"
    result = export_onnx(model, kwargs={"input_ids": input_ids(2, 7), "adapter_ids": torch.tensor([0, 1])}, path=path)
    return result, load_session(path, device="cpu")


@pytest.mark.slow
def test_onnx_mixed_batch_equals_rows_with_dynamic_batch(stacked, stacked_export):
    model, ids, expected = stacked
    result, session = stacked_export
    assert result.max_abs_error < 1e-4 and len(result.block_inputs) == 14
    graph = onnx.load(str(result.path)).graph
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert shapes["adapter_ids"] == ["batch"]
    assert shapes["model.layers.0.self_attn.q_proj.miss_stack"] == ["adapters", 6, 32]
    assert [n.op_type for n in graph.node if n.domain == "miss"] == ["StackedMissLinear"] * 14
    by_id = adapter_ids_for(model, MIX)
    (logits,) = session.run({"input_ids": ids, "adapter_ids": by_id})[:1]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    (single,) = session.run({"input_ids": ids[:1], "adapter_ids": by_id[:1]})[:1]
    torch.testing.assert_close(single, expected[:1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"adapter_ids \[-2\]: ids run from 0 .* and -1 means no adapter"):
        session.run({"input_ids": ids[:1], "adapter_ids": torch.tensor([-2])})
    n = len(model.miss_stack_names)  # id n is Gather's last row, the zero block: the base output, silently
    with pytest.raises(ValueError, match=rf"adapter_ids \[{n}\]: ids run from 0 to {n} \(the stacked adapters\) - 1"):
        session.run({"input_ids": ids[:1], "adapter_ids": torch.tensor([n])})


@pytest.mark.slow
def test_onnx_adding_an_adapter_is_a_new_stack_file_not_a_new_export(stacked, stacked_export, tmp_path):
    _, session = stacked_export
    model = clone(stacked[0])
    apply_miss(model, MissConfig(r=3, variant="mini", mini_r=4, target_modules=["up_proj", "o_proj"]), "d")
    randomize_all(model, seed=11)  # new blocks for every adapter, the added one included
    stack_adapters(model)
    adapter_file = write_onnx_stack(model, tmp_path / "four.onnx_adapter", stacked_export[0].path)
    names = ["d", None, "a", "d", "c", "b"]
    ids = input_ids(len(names), 6, seed=9)
    (logits,) = session.run({"input_ids": ids, "adapter_ids": adapter_ids_for(model, names)}, adapter=adapter_file)[:1]
    torch.testing.assert_close(logits, rows_alone(model, ids, names), atol=1e-4, rtol=1e-4)
