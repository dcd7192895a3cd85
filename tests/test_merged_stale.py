"""make_backend(merge=True) folds frozen blocks into W as compile-time constants: an in-place change
afterwards (load_adapter, copy_ under no_grad) must raise with the fix, never serve the old fold."""

import peft
import pytest
import torch
from helpers import build, clone, input_ids, model_output, randomize_blocks

from miss_compile import MissConfig, apply_miss, load_adapter, make_backend, save_adapter
from miss_compile.backend import FrozenCheck, frozen_parameters
from miss_compile.peft_compat import named_miss_layers

pytestmark = pytest.mark.slow

CONFIG = MissConfig(r=3, init="random", target_modules="all-linear")


def frozen_model():
    model = apply_miss(build("llama"), CONFIG)
    randomize_blocks(model)
    return model.requires_grad_(False)


def merged_call(compiled, ids):
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):  # parameters traced as constants
        return model_output(compiled, ids)


def served_merged():
    """The frozen model, its merge=True compile, and ids it has served once (its constants are frozen)."""
    model = frozen_model()
    compiled = torch.compile(model, backend=make_backend(merge=True))
    ids = input_ids()
    merged_call(compiled, ids)
    return model, compiled, ids


def test_in_place_load_raises_then_a_recompile_serves_the_new_blocks(tmp_path):
    model = frozen_model()
    other = clone(model)
    randomize_blocks(other, seed=11)
    save_adapter(other, tmp_path)
    ids = input_ids()
    backend = make_backend(merge=True)
    compiled = torch.compile(model, backend=backend)
    before = merged_call(compiled, ids)
    torch.testing.assert_close(merged_call(compiled, ids), before)  # unchanged: no false alarm
    assert all(item.merged for item in backend.graph_pass.reports[0].rewritten)
    # traced under freezing the model is Dynamo's args[0]: the report still names layers as the model does
    assert backend.graph_pass.reports[0].rewritten[0].layer == "model.layers.0.self_attn.q_proj"

    load_adapter(model, tmp_path)  # copies into the existing blocks under no_grad
    with pytest.raises(RuntimeError, match=r"the block \(3, 32\) of merged layer 'model\.layers\.0\.self_attn\.q_proj' "
                                           r"\(and 13 more\) changed in place.*torch\.compiler\.reset\(\).*unmerged"):
        merged_call(compiled, ids)

    torch.compiler.reset()  # the fix the message names; a warm Inductor cache must not bring the old fold back
    after = merged_call(compiled, ids)
    with torch.no_grad():
        torch.testing.assert_close(after, model_output(other, ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after, atol=1e-3)


def test_in_place_change_of_a_merged_base_weight_raises():
    model, compiled, ids = served_merged()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.base_layer.weight.mul_(2)
    with pytest.raises(RuntimeError, match=r"the base weight \(32, 48\) of merged layer 'model\.layers\.1\.mlp\.down_proj'"):
        merged_call(compiled, ids)


def test_in_place_change_of_any_frozen_parameter_raises():
    """Freezing makes every parameter a constant, not only the merged ones."""
    model, compiled, ids = served_merged()
    with torch.no_grad():
        model.model.norm.weight.add_(1)
    with pytest.raises(RuntimeError, match=r"parameter model_norm_weight \(32,\) changed in place"):
        merged_call(compiled, ids)


def test_unmerged_backend_needs_no_check():
    """miss_backend reads blocks on every call (load_adapter takes effect in place): nothing to guard."""
    model = frozen_model()
    backend = make_backend()
    compiled = torch.compile(model, backend=backend)
    ids = input_ids()
    with torch.no_grad():
        model_output(compiled, ids)
        randomize_blocks(model, seed=5)
        torch.testing.assert_close(model_output(compiled, ids), model_output(model, ids), atol=1e-5, rtol=1e-5)


def test_version_counters_see_copy_under_no_grad_but_not_writes_into_data():
    """What the check relies on, and its documented limit: writes into `.data` bypass version counters."""
    block = torch.nn.Parameter(torch.zeros(3, 4), requires_grad=False)
    check = FrozenCheck([("the block", block)])
    block.data.copy_(torch.ones(3, 4))  # invisible to autograd's version counter
    check()
    with torch.no_grad():
        block.copy_(torch.zeros(3, 4))
    with pytest.raises(RuntimeError, match="the block changed in place"):
        check()
    check.record()
    block.data = torch.ones(3, 4)  # a new storage: no version bump, but another address
    with pytest.raises(RuntimeError, match="the block changed in place"):
        check()


def test_frozen_parameters_name_the_merged_layers_first():
    model = frozen_model()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return backend(gm, example_inputs)

    backend = make_backend(merge=True)
    merged_call(torch.compile(model, backend=capture), input_ids())
    frozen = frozen_parameters(graphs[0])
    layers = named_miss_layers(model)
    merged = [what for what, _ in frozen if "merged layer" in what]
    assert len(merged) == 2 * len(layers)  # each layer's base weight and block
    assert [what for what, _ in frozen[: len(merged)]] == merged
    assert {id(t) for _, t in frozen} >= {id(layer.miss_block["default"]) for layer in layers.values()}


def test_a_graph_that_writes_its_parameters_itself_is_no_false_alarm():
    """PEFT's bat forward on CPU reassigns `block.data` (same values) on every call: the compiled graph
    replays that write; only writes between calls are changes the frozen constants miss."""
    model = peft.get_peft_model(build("llama", torch.bfloat16), MissConfig(r=8, variant="bat", target_modules="all-linear")
                                .to_peft(), autocast_adapter_dtype=False).eval()  # bf16 blocks: PEFT's cast path
    randomize_blocks(model)
    model.requires_grad_(False)
    compiled = torch.compile(model, backend=make_backend(merge=True))
    ids = input_ids()
    first, second = merged_call(compiled, ids), merged_call(compiled, ids)
    torch.testing.assert_close(second, first)
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.miss_block["default"].mul_(2)
    with pytest.raises(RuntimeError, match=r"base_model\.model\.model_layers_0_self_attn_q_proj_miss_block_default "
                                           r"\(4, 8, 8\) changed in place"):
        merged_call(compiled, ids)


def test_merged_graphs_with_several_inputs_and_shapes_serve_and_check():
    """A padded batch with its mask, then other lengths (Dynamo's dynamic graph takes sizes as inputs):
    the checked merged graph passes every input through and gives eager's numbers, and still raises
    on a stale fold after the dynamic recompile."""
    model = frozen_model()
    compiled = torch.compile(model, backend=make_backend(merge=True))
    for batch, seq in ((2, 7), (3, 9), (2, 5)):
        ids = input_ids(batch, seq)
        mask = torch.ones_like(ids)
        mask[0, :2] = 0  # left padding
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            got = compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits
            expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.miss_block["default"].add_(1)
    ids = input_ids(3, 9)  # a shape and a signature the dynamic graph already serves
    with pytest.raises(RuntimeError, match=r"changed in place"), torch.no_grad():
        compiled(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


def test_in_place_change_of_a_frozen_buffer_raises():
    """Freezing folds buffers the graph does not write as constants too: a changed buffer must raise."""

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 4)
            self.register_buffer("scale", torch.ones(4))

        def forward(self, x):
            return self.proj(x) * self.scale

    model = apply_miss(Scaled().eval(), MissConfig(r=2, init="random", target_modules=["proj"])).requires_grad_(False)
    compiled = torch.compile(model, backend=make_backend(merge=True))
    x = torch.randn(3, 8)
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        torch.testing.assert_close(compiled(x), model(x))
        model.scale.mul_(2)
        with pytest.raises(RuntimeError, match=r"buffer scale \(4,\) .*changed in place"):
            compiled(x)
