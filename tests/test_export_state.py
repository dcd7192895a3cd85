"""ONNX exports give what the model's forward gives in the state it is in: PEFT merged and/or
disabled, a tied lm_head merged (the embedding in the graph stays the base one, bit for bit)."""

import contextlib

import numpy as np
import onnx
import peft
import pytest
import torch
from cases import TIED
from helpers import build, embedding_weight, head, input_ids, model_output, randomize_blocks, tied_pair
from onnx import numpy_helper

from miss_compile import MissConfig, merge_adapters
from miss_compile.export import export_onnx, load_session

pytestmark = pytest.mark.slow

TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}


def onnx_logits(path, ids):
    return load_session(path, device="cpu").run({"input_ids": ids})[0]


# (PEFT merged, PEFT disabled): each state a user can export from.
STATES = {"merged-disabled": (True, True), "merged-enabled": (True, False), "unmerged-disabled": (False, True)}


@pytest.mark.parametrize("merged_export", [True, False], ids=["merged-export", "unmerged-export"])
@pytest.mark.parametrize("state", list(STATES))
def test_export_of_a_peft_model_gives_peft_output_in_each_state(tmp_path, state, merged_export):
    peft_merged, disabled = STATES[state]
    theirs = peft.get_peft_model(build("llama"), MissConfig(r=3, init="random", target_modules="all-linear").to_peft())
    randomize_blocks(theirs)
    if peft_merged:
        theirs.merge_adapter()
    ids, other_ids = input_ids(2, 7), input_ids(3, 9, seed=5)
    with theirs.disable_adapter() if disabled else contextlib.nullcontext():
        export_onnx(theirs, kwargs={"input_ids": ids}, path=tmp_path / "model.onnx", merged=merged_export)
        assert all(layer.merged == peft_merged for layer in _peft_layers(theirs))  # the export touched a copy
        expected = [model_output(theirs, i) for i in (ids, other_ids)]  # PEFT's forward (may unmerge it)
    for i, want in zip((ids, other_ids), expected, strict=True):
        torch.testing.assert_close(onnx_logits(tmp_path / "model.onnx", i), want, **TOLERANCE)


def _peft_layers(model):
    return [m for m in model.modules() if isinstance(m, peft.tuners.miss.MissLayer)]


def _initializers(path):
    return [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]


@pytest.mark.parametrize("merged_before", [False, True], ids=["model-unmerged", "model-merged"])
@pytest.mark.parametrize("model_name", list(TIED))
def test_export_of_a_tied_head_keeps_the_base_embedding(tmp_path, model_name, merged_before):
    base, ours = tied_pair(model_name)
    ids = input_ids()
    expected = model_output(ours, ids)
    if merged_before:
        merge_adapters(ours)
    head_weight = head(ours).base_layer.weight
    for merged in (True, False):
        path = tmp_path / f"{merged}.onnx"
        export_onnx(ours, kwargs={"input_ids": ids}, path=path, merged=merged)
        torch.testing.assert_close(onnx_logits(path, ids), expected, **TOLERANCE)
        embedding = embedding_weight(base, model_name).detach().numpy()
        assert any(np.array_equal(value, embedding) for value in _initializers(path))  # bit for bit
    assert torch.equal(embedding_weight(ours, model_name), embedding_weight(base, model_name))
    assert head(ours).base_layer.weight is head_weight  # the model itself kept its state
    assert head(ours).merged == merged_before


def test_fp16_merged_export_of_a_tied_head(tmp_path):
    base, ours = tied_pair("gpt2")  # Conv1D layers adapted too
    ids = input_ids()
    result = export_onnx(ours, kwargs={"input_ids": ids}, path=tmp_path / "model.onnx", merged=True,
                         dtype=torch.float16)
    torch.testing.assert_close(onnx_logits(result.path, ids).float(), model_output(ours, ids), atol=1e-2, rtol=1e-2)
    embedding = embedding_weight(base, "gpt2").detach().half().numpy()
    assert any(np.array_equal(value, embedding) for value in _initializers(result.path))


def test_merged_export_is_validated_against_the_adapters_as_they_run(tmp_path, monkeypatch):
    """A merge that damages what it must not (here: W + dW written into the tied embedding, the old
    bug) is caught: validation compares with outputs taken before merging, not the merged copy."""
    _, ours = tied_pair("llama")

    def damaging_merge(model):
        layer = head(model)
        merged = layer.base_weight() + torch.randn_like(layer.base_weight())
        with torch.no_grad():
            layer.base_layer.weight.copy_(merged)  # the shared Parameter: the embedding changes too
        layer.merged_adapters.append("default")

    monkeypatch.setattr("miss_compile.export.onnx.merge_adapters", damaging_merge)
    with pytest.raises(ValueError, match=r"differs from torch"):
        export_onnx(ours, kwargs={"input_ids": input_ids()}, path=tmp_path / "model.onnx", merged=True)
    assert not (tmp_path / "model.onnx").exists()
