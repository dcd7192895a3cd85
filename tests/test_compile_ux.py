"""torch.compile as users call it: every mode and options= pass through to Inductor, and a compile that
adapts nothing (or leaves MiSS layers untouched) says so once at WARNING, while a full rewrite is quiet."""

import contextvars
import copy
import logging

import peft
import pytest
import torch
from small_models import TwoLinears
from torch import nn

import miss_compile.backend
from miss_compile import make_backend, miss_backend
from miss_compile.backend import inductor_options
from miss_compile.peft_compat import named_miss_layers

MODES = list(torch._inductor.list_mode_options())  # default, lite, reduce-overhead, max-autotune-no-cudagraphs, ...


def peft_two_linears(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = peft.get_peft_model(TwoLinears(), peft.MissConfig(r=4, target_modules=["up", "down"]))
    with torch.no_grad():
        for layer in named_miss_layers(model).values():
            layer.miss_block["default"].copy_(torch.randn_like(layer.miss_block["default"]) * 0.1)
    return model.eval()


@pytest.fixture
def seen_patches(monkeypatch):
    """The config patches every graph reached Inductor with."""
    seen = []
    compile_fx = miss_compile.backend.compile_fx

    def recording(gm, example_inputs, config_patches):
        seen.append(dict(config_patches))
        return compile_fx(gm, example_inputs, config_patches=config_patches)

    monkeypatch.setattr(miss_compile.backend, "compile_fx", recording)
    return seen


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_compiles_with_the_pass_and_matches_eager(mode, seen_patches):
    model = peft_two_linears()
    x = torch.randn(3, 5, 12)
    before = len(miss_backend.graph_pass.reports)
    compiled = torch.compile(model, backend="miss", mode=mode)
    with torch.no_grad():
        expected, got = model(x), compiled(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    reports = miss_backend.graph_pass.reports[before:]
    assert [len(report.rewritten) for report in reports] == [2]  # both Linears became miss ops
    for key, value in torch._inductor.list_mode_options(mode).items():
        assert seen_patches[-1][key] == value, (mode, key)
    assert "pre_grad_custom_pass" in seen_patches[-1]  # the cache key is still ours


def test_options_reach_inductor_and_override_config_patches(seen_patches):
    model = peft_two_linears()
    x = torch.randn(4, 12)
    backend = make_backend(config_patches={"epilogue_fusion": True, "max_autotune_gemm": False})
    compiled = torch.compile(model, backend=backend, options={"epilogue-fusion": False, "size_asserts": False})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    patches = seen_patches[-1]
    assert patches["epilogue_fusion"] is False and patches["size_asserts"] is False
    assert patches["max_autotune_gemm"] is False  # make_backend's own patches stay where options say nothing
    assert len(backend.graph_pass.reports[-1].rewritten) == 2


def test_merged_backend_takes_a_mode_and_folds():
    model = peft_two_linears().requires_grad_(False)
    x = torch.randn(4, 12)
    backend = make_backend(merge=True)
    compiled = torch.compile(model, backend=backend, mode="max-autotune-no-cudagraphs")
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert [item.merged for item in backend.graph_pass.reports[-1].rewritten] == [True, True]


def test_unknown_modes_and_options_are_refused_as_inductor_refuses_them():
    with pytest.raises(RuntimeError, match="Unrecognized mode=fastest"):
        inductor_options(mode="fastest")
    with pytest.raises(RuntimeError, match="Unexpected optimization option no_such_option"):
        inductor_options(options={"no_such_option": 1})
    with pytest.raises(ValueError, match="pre_grad_custom_pass.*post_grad_custom_pre_pass"):
        inductor_options(options={"pre_grad_custom_pass": None})
    assert inductor_options() == {} and inductor_options(mode="default") == {}
    assert inductor_options(mode="reduce-overhead") == {"triton.cudagraphs": True}
    compiled = torch.compile(peft_two_linears(), backend="miss", options={"no_such_option": 1})
    with pytest.raises(Exception, match="no_such_option"):  # Dynamo wraps the backend's error
        compiled(torch.randn(2, 12))


# --- saying when the pass did not adapt


def _warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.levelno >= logging.WARNING and record.name.startswith("miss_compile")]


def test_a_full_rewrite_is_quiet(caplog):
    model = peft_two_linears()
    with caplog.at_level(logging.INFO, logger="miss_compile"), torch.no_grad():
        torch.compile(model, backend=make_backend())(torch.randn(2, 12))
    assert _warnings(caplog) == []
    assert any("2 MiSS Linear(s) as miss ops" in record.getMessage() for record in caplog.records)  # INFO


def test_a_model_without_miss_layers_warns_once(caplog):
    torch.manual_seed(0)
    model = TwoLinears().eval()
    compiled = torch.compile(model, backend=make_backend(), dynamic=False)
    with caplog.at_level(logging.WARNING, logger="miss_compile"), torch.no_grad():
        for batch in (2, 3, 4):  # a recompile per shape: still one warning
            x = torch.randn(batch, 12)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    messages = _warnings(caplog)
    assert len(messages) == 1, messages
    assert "no MiSS layer among the 2 Linear layer(s)" in messages[0]
    assert "down, up" in messages[0] and "miss_compile.explain(model, *inputs)" in messages[0]


class _BreakBeforeHead(nn.Module):
    """Adapted layers, a graph break, then a plain head: two graphs, as gradient checkpointing makes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = TwoLinears()
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.body(x)
        torch._dynamo.graph_break()
        return self.head(hidden)


def test_a_plain_head_split_off_after_adapted_layers_is_quiet(caplog):
    torch.manual_seed(0)
    model = peft.get_peft_model(_BreakBeforeHead(), peft.MissConfig(r=4, target_modules=["up", "down"])).eval()
    backend = make_backend()
    x = torch.randn(2, 12)
    with caplog.at_level(logging.WARNING, logger="miss_compile"), torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=backend)(x), model(x), rtol=1e-5, atol=1e-6)
    assert [len(report.rewritten) for report in backend.graph_pass.reports] == [2, 0]  # two graphs, the head's plain
    assert _warnings(caplog) == []


class _ActiveKernels:
    """Python state a checkpointed forward sets and resets, as transformers >= 5.25's attention does
    (kernels' CompileableContextVar): Dynamo does not trace that inside a checkpoint's body by default."""

    def __init__(self) -> None:
        self.value = None

    def set(self, value: dict) -> dict | None:
        previous, self.value = self.value, value
        return previous

    def reset(self, previous: dict | None) -> None:
        self.value = previous


_KERNELS = _ActiveKernels()


class _SideEffectingCheckpoint(_BreakBeforeHead):
    """Adapted layers in a checkpoint that sets and resets Python state, then a plain head."""

    def region(self, x: torch.Tensor) -> torch.Tensor:
        token = _KERNELS.set({"attention": self.body.forward})  # not a constant: Dynamo cannot check its restoring
        try:
            return self.body(x)
        finally:
            _KERNELS.reset(token)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.utils.checkpoint.checkpoint(self.region, x, use_reentrant=False))


_CAPTURE = contextvars.ContextVar("capture", default=None)


class _CapturingCheckpoint(_SideEffectingCheckpoint):
    """A checkpointed forward that reads a ContextVar, as transformers 5.25's output capture does under
    output_hidden_states: a graph break inside the checkpoint, whatever the setting."""

    def region(self, x: torch.Tensor) -> torch.Tensor:
        _CAPTURE.get()
        return self.body(x)


def _train_step_checkpointed(caplog, model_class: type = _SideEffectingCheckpoint) -> tuple[nn.Module, object]:
    """One compiled training step of adapted layers inside a checkpoint; gradients equal eager's."""
    torch.manual_seed(0)
    model = peft.get_peft_model(model_class(), peft.MissConfig(r=4, target_modules=["up", "down"]))
    for layer in named_miss_layers(model).values():
        layer.miss_block["default"].data.normal_(0, 0.1)
    reference = copy.deepcopy(model)
    backend = make_backend()
    x = torch.randn(2, 12)
    with caplog.at_level(logging.WARNING, logger="miss_compile"):
        torch.compile(model, backend=backend)(x).square().sum().backward()
    reference(x).square().sum().backward()
    for (name, param), expected in zip(model.named_parameters(), reference.parameters(), strict=True):
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected.grad, rtol=1e-5, atol=1e-6, msg=name)
    return model, backend


def test_checkpointed_regions_run_eagerly_warn_with_the_setting(caplog):
    """Dynamo runs a checkpoint whose forward writes Python state eagerly: no graph of those layers
    reaches the backend, so it must say so from Dynamo's record, naming the setting that fixes it."""
    torch.compiler.reset()
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=False):
        _, backend = _train_step_checkpointed(caplog)
    assert sum(len(report.rewritten) for report in backend.graph_pass.reports) == 0  # the layers ran eagerly
    messages = _warnings(caplog)
    assert len(messages) == 1, messages
    assert "ran activation-checkpointed regions eagerly" in messages[0]
    assert "torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True" in messages[0]


def test_checkpointed_regions_with_the_setting_are_rewritten(caplog):
    torch.compiler.reset()
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        _, backend = _train_step_checkpointed(caplog)
    assert sorted(item.layer for report in backend.graph_pass.reports for item in report.rewritten) == [
        "base_model.model.body.down", "base_model.model.body.up"]
    assert _warnings(caplog) == []
    assert _KERNELS.value is None  # set and reset, as in eager


def test_a_graph_break_inside_a_checkpoint_warns_naming_it(caplog):
    torch.compiler.reset()
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        _, backend = _train_step_checkpointed(caplog, _CapturingCheckpoint)
    assert sum(len(report.rewritten) for report in backend.graph_pass.reports) == 0  # the layers ran eagerly
    messages = _warnings(caplog)
    assert len(messages) == 1, messages
    assert "a graph break inside one (" in messages[0] and "test_compile_ux.py:" in messages[0]
    assert "output_hidden_states" in messages[0] and "TORCH_LOGS=graph_breaks" in messages[0]


def _as_transformers_wraps(forward):
    """transformers 5.25 wraps every decoder layer's forward in `forward_with_checkpointing`, which calls
    it directly when checkpointing is off: a break under it is no checkpoint's."""

    def forward_with_checkpointing(self, *args):
        return forward(self, *args)

    return forward_with_checkpointing


class _LayerWrapperWithoutCheckpointing(_CapturingCheckpoint):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.region(x))

    forward = _as_transformers_wraps(forward)


def test_a_graph_break_outside_any_checkpoint_is_not_called_one(caplog):
    torch.compiler.reset()
    model = peft.get_peft_model(_LayerWrapperWithoutCheckpointing(), peft.MissConfig(r=4, target_modules=["up", "down"]))
    with caplog.at_level(logging.WARNING, logger="miss_compile"):
        torch.compile(model.eval(), backend=make_backend())(torch.randn(2, 12))
    assert not any("checkpointed regions" in message for message in _warnings(caplog)), _warnings(caplog)


def test_every_reset_warns_again_even_one_dynamo_does_not_tell_the_backend_about(caplog):
    """torch.compiler.reset() calls backend.reset only for compiles made since the previous reset; the
    emptied graph-break record tells the backend of the others."""
    compiled = torch.compile(_SideEffectingCheckpoint(), backend=make_backend())
    x = torch.randn(2, 12)
    with (torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=False),
          caplog.at_level(logging.WARNING, logger="miss_compile")):
        for _ in range(3):
            torch.compiler.reset()
            compiled(x).sum().backward()
            compiled(x).sum().backward()  # no new break: no second warning
    assert sum("checkpointed regions eagerly" in message for message in _warnings(caplog)) == 3


def test_a_later_backend_is_not_told_of_earlier_eager_checkpoints(caplog):
    torch.compiler.reset()
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=False):
        _train_step_checkpointed(caplog)
    with caplog.at_level(logging.WARNING, logger="miss_compile"), torch.no_grad():
        torch.compile(TwoLinears().eval(), backend=make_backend())(torch.randn(2, 12))
    messages = _warnings(caplog)
    assert len(messages) == 2, messages
    assert "checkpointed regions eagerly" in messages[0] and "no MiSS layer among the 2 Linear" in messages[1]


def test_a_graph_without_linears_is_quiet(caplog):
    with caplog.at_level(logging.WARNING, logger="miss_compile"):
        torch.compile(lambda x: torch.relu(x) * 2, backend=make_backend())(torch.randn(3))
    assert _warnings(caplog) == []


def test_disabled_adapters_warn_once_then_reset_warns_again(caplog):
    model = peft_two_linears()
    backend = make_backend()
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(2, 12)
    with caplog.at_level(logging.WARNING, logger="miss_compile"), torch.no_grad():
        compiled(x)
        assert _warnings(caplog) == []
        with model.disable_adapter():
            torch.testing.assert_close(compiled(x), model.get_base_model()(x), rtol=1e-5, atol=1e-6)
        assert len(_warnings(caplog)) == 1 and "disabled" in _warnings(caplog)[0]
        torch.compiler.reset()  # a fresh start: the same graph warns again
        with model.disable_adapter():
            compiled(x)
    assert len(_warnings(caplog)) == 2


class _ScaledBranch(nn.Module):
    """A MiSS-looking adapter branch the pass must refuse: the chunk sum scaled by 2 before the block."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(12, 8)
        self.block = nn.Parameter(torch.randn(4, 8) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x.reshape(*x.shape[:-1], 3, 4).sum(-2) * 2) @ self.block


class _EagerCheckpointBesideALookalike(_SideEffectingCheckpoint):
    """The side-effecting checkpoint beside a branch the pass refuses: both must be said."""

    def __init__(self) -> None:
        super().__init__()
        self.lookalike = _ScaledBranch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.head(self.lookalike(x))


def test_eager_checkpoints_do_not_hide_untouched_layers(caplog):
    torch.compiler.reset()
    model = _EagerCheckpointBesideALookalike()
    x = torch.randn(2, 12)
    with (torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=False),
          caplog.at_level(logging.WARNING, logger="miss_compile")):
        torch.testing.assert_close(torch.compile(model, backend=make_backend())(x), model(x), rtol=1e-5, atol=1e-6)
    messages = _warnings(caplog)
    assert len(messages) == 2, messages
    assert "ran activation-checkpointed regions eagerly" in messages[0]
    assert "MiSS layer(s) left untouched" in messages[1] and "lookalike" in messages[1]


def test_untouched_layers_warn_once_naming_count_and_explain(caplog):
    model = _ScaledBranch().eval()
    backend = make_backend()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with caplog.at_level(logging.WARNING, logger="miss_compile"), torch.no_grad():
        for batch in (2, 3):
            x = torch.randn(batch, 12)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    skipped = backend.graph_pass.reports[-1].skipped
    assert skipped, "the branch should look like an adapter and be refused"
    messages = _warnings(caplog)
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"miss_backend: {len(skipped)} MiSS layer(s) left untouched")
    assert skipped[0][1] in messages[0] and "miss_compile.explain(model, *inputs)" in messages[0]


# --- freezing from anywhere makes parameters constants: an in-place change raises, never serves the old ones


def test_unmerged_backend_under_global_freezing_raises_on_a_changed_block():
    model = peft_two_linears()
    x = torch.randn(3, 12)
    compiled = torch.compile(model, backend=make_backend())
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):  # Dynamo traces parameters as constants
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
        named_miss_layers(model)["up"].miss_block["default"].add_(0.5)  # as load_adapter would
        with pytest.raises(RuntimeError, match=r"up.*changed in place.*freezing off"):
            compiled(x)


def test_freezing_in_options_alone_keeps_parameters_as_inputs():
    """Dynamo decides while tracing whether parameters are constants, from the global config: options=
    reach Inductor only after that, so blocks stay graph inputs and an in-place change is seen."""
    model = peft_two_linears()
    x = torch.randn(3, 12)
    compiled = torch.compile(model, backend="miss", options={"freezing": True})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
        named_miss_layers(model)["up"].miss_block["default"].add_(0.5)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
