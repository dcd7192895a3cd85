"""What an export takes and gives: the inputs the model uses (attention_mask, token_type_ids) as graph
inputs, padded batches equal to torch with the mask at the real tokens, the model's output names,
provenance in metadata_props, validation that compares only the positions the mask keeps, and the
input_names / output_names / dynamic_shapes / validation_inputs a KV-cache wrapper exports with."""

import json

import onnx
import pytest
import torch
from helpers import build, input_ids, randomize_blocks

from miss_compile import MissConfig, apply_miss, save_adapter
from miss_compile.export import export_onnx, load_session
from miss_compile.export.cli import main
from miss_compile.export.validate import Case, kept_positions, validate_export

pytestmark = pytest.mark.slow

CONFIG = dict(r=3, init="random", target_modules="all-linear")


def adapted(name: str) -> torch.nn.Module:
    model = apply_miss(build(name), MissConfig(**CONFIG))
    randomize_blocks(model)
    return model


def padded_mask(batch: int, length: int, side: str) -> torch.Tensor:
    """Row b keeps length - 2b tokens (at least 1), padding on `side`."""
    real = (length - 2 * torch.arange(batch)).clamp(min=1)[:, None]
    position = torch.arange(length)[None, :]
    return (position >= length - real if side == "left" else position < real).long()


def assert_equal_at_real_tokens(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> None:
    keep = mask.bool()
    assert got.shape == want.shape
    assert (got[keep] - want[keep]).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny adapted BERT exported with input_ids, attention_mask and token_type_ids (all-ones mask)."""
    model = adapted("bert")
    ids = input_ids(2, 8)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    path = tmp_path_factory.mktemp("bert") / "model.onnx"
    result = export_onnx(model, kwargs=kwargs, path=path, merged=True, metadata={"task": "feature-extraction"})
    return model, result


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_bert_batch_equals_torch_with_the_mask(bert, side):
    model, result = bert
    session = load_session(result.path, device="cpu")
    assert session.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert session.output_names == ["last_hidden_state", "pooler_output"]
    ids = input_ids(4, 11, seed=5)
    mask = padded_mask(4, 11, side)
    types = (torch.arange(11) >= 6).long().expand(4, 11).contiguous()
    got, pooled = session.run({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert_equal_at_real_tokens(got, want.last_hidden_state, mask)
    if side == "right":  # [CLS] at position 0 is a real token in every row
        assert (pooled - want.pooler_output).abs().max().item() < 1e-4
    # the mask is really used: without it the real tokens of padded rows change
    unmasked, _ = session.run({"input_ids": ids, "attention_mask": torch.ones_like(mask), "token_type_ids": types})
    assert (unmasked[mask.bool()] - got[mask.bool()]).abs().max().item() > 1e-3


def test_provenance_in_metadata_and_nothing_beside_the_model(bert):
    _, result = bert
    properties = {p.key: p.value for p in onnx.load(str(result.path), load_external_data=False).metadata_props}
    assert properties["miss_compile.base_model"] == "BertModel"
    assert json.loads(properties["miss_compile.adapters"]) == {"default": "balance"}
    assert json.loads(properties["miss_compile.active_adapters"]) == ["default"]
    assert properties["miss_compile.merged"] == "true" and properties["miss_compile.stacked"] == "false"
    assert properties["miss_compile.version"] == "0.1.0"
    assert properties["task"] == "feature-extraction"
    assert sorted(p.name for p in result.path.parent.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("name,merged", [("gpt2", True), ("llama", False)])
def test_padded_decoder_rows_equal_torch_with_the_mask(tmp_path, name, merged):
    """Exported with a left-padded mask (validation compares the real tokens only), then run on other
    padded rows, left and right."""
    model = adapted(name)
    ids = input_ids(3, 9)
    example = {"input_ids": ids, "attention_mask": padded_mask(3, 9, "left")}
    result = export_onnx(model, kwargs=example, path=tmp_path / "model.onnx", merged=merged)
    assert result.output_names == ["logits"] and result.max_abs_error < 1e-4
    session = load_session(result.path, device="cpu")
    for side in ("left", "right"):
        ids, mask = input_ids(3, 12, seed=6), padded_mask(3, 12, side)
        (logits,) = session.run({"input_ids": ids, "attention_mask": mask})
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert_equal_at_real_tokens(logits, want, mask)


def test_kept_positions_rule():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    logits = torch.zeros(2, 4, 5)  # [batch, seq = mask length, vocab]
    assert kept_positions(logits, mask).expand_as(logits)[0, 0].any().item() is False
    assert kept_positions(logits, mask).expand_as(logits)[0, 1].all().item() is True
    present = torch.zeros(2, 3, 4, 5)  # [batch, heads, past + seq = mask length, head_dim]
    assert kept_positions(present, mask).shape == (2, 1, 4, 1)
    step = torch.zeros(2, 1, 5)  # one decode step: the mask's last column
    assert kept_positions(step, mask).tolist() == [[[True]], [[True]]]
    prefix = torch.zeros(2, 2, 5)  # two new tokens: the mask's last two columns
    assert kept_positions(prefix, mask).flatten().tolist() == [True, True, True, True]
    assert kept_positions(torch.zeros(2, 7), mask) is None  # pooled rows: compared whole
    heads_like_length = torch.zeros(2, 4, 4, 5)  # [batch, kv_heads = 4 = mask length, past + seq, head_dim]
    assert kept_positions(heads_like_length, mask).shape == (2, 4, 1, 1)  # by size alone: the heads axis
    assert kept_positions(heads_like_length, mask, static_axes={1, 3}).shape == (2, 1, 4, 1)
    assert kept_positions(logits, None) is None


class Doubler(torch.nn.Module):
    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        return {"out": x * 2 * attention_mask[..., None]}


def test_validation_compares_only_kept_positions(tmp_path):
    x, mask = torch.randn(2, 4, 3), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    result = export_onnx(Doubler(), kwargs={"x": x, "attention_mask": mask}, path=tmp_path / "d.onnx")
    assert result.output_names == ["out"]
    case = Case("the example", (), {"x": x, "attention_mask": mask}, mask)
    right = Doubler()(x, mask)["out"]
    wrong_at_padding = right.clone()
    wrong_at_padding[0, 0] += 5
    assert validate_export(Doubler(), result.path, [case], [[wrong_at_padding]]) == (0.0, 0.0)
    wrong_at_a_token = right.clone()
    wrong_at_a_token[1, 0, 2] += 5
    with pytest.raises(ValueError, match=r"output 'out' \(2, 4, 3\) on the example differs from torch by 5"):
        validate_export(Doubler(), result.path, [case], [[wrong_at_a_token]])
    nan_at_a_token = right.clone()
    nan_at_a_token[1, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"differs from torch by inf"):
        validate_export(Doubler(), result.path, [case], [[nan_at_a_token]])


class CacheStep(torch.nn.Module):
    """The shape of a KV-cache wrapper: ids, mask over past + current, positions, a list of past tensors
    [batch, heads, past, dim] in; a dict of logits and presents out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 4)
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        hidden = self.proj(self.embed(input_ids)) + position_ids[..., None]
        out = {"logits": hidden * attention_mask[:, -hidden.shape[1]:, None]}
        for i, past in enumerate(past_key_values):
            out[f"present.{i}.key"] = torch.cat([past, hidden[:, None]], 2)
        return out


def cache_inputs(batch: int, seq: int, past: int) -> dict:
    generator = torch.Generator().manual_seed(batch * 100 + seq * 10 + past)
    return {"input_ids": torch.randint(0, 16, (batch, seq), generator=generator),
            "attention_mask": torch.ones(batch, past + seq, dtype=torch.int64),
            "position_ids": (torch.arange(seq) + past).expand(batch, seq).contiguous(),
            "past_key_values": [torch.randn(batch, 1, past, 4, generator=generator) for _ in range(2)]}


CACHE_SHAPES = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
                "position_ids": {0: "batch", 1: "sequence"}, "past_key_values": [{0: "batch", 2: "past"}] * 2}
CACHE_NAMES = dict(input_names=["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                                "past_key_values.1.key"],
                   output_names=["logits", "present.0.key", "present.1.key"])


def test_cache_wrapper_exports_with_names_shapes_and_validation_inputs(tmp_path):
    model = CacheStep()
    result = export_onnx(model, kwargs=cache_inputs(2, 3, 4), path=tmp_path / "step.onnx", **CACHE_NAMES,
                         dynamic_shapes=CACHE_SHAPES, validation_inputs=[cache_inputs(3, 5, 0), cache_inputs(1, 1, 6)])
    assert result.input_names == CACHE_NAMES["input_names"] and result.output_names == CACHE_NAMES["output_names"]
    session = load_session(result.path, device="cpu")
    for batch, seq, past in [(1, 1, 9), (2, 6, 0)]:  # a decode step and a prefill
        feeds = cache_inputs(batch, seq, past)
        pasts = feeds.pop("past_key_values")
        got = session.run({**feeds, "past_key_values.0.key": pasts[0], "past_key_values.1.key": pasts[1]})
        with torch.no_grad():
            want = model(**feeds, past_key_values=pasts)
        for name, value in zip(CACHE_NAMES["output_names"], got, strict=True):
            assert (value - want[name]).abs().max().item() < 1e-5


def test_validation_inputs_are_run_and_a_failure_writes_nothing(tmp_path):
    bad = cache_inputs(2, 3, 4)
    bad["attention_mask"] = torch.ones(3, 7, dtype=torch.int64)  # 3 rows for a batch of 2
    with pytest.raises(RuntimeError, match=r"size"):
        export_onnx(CacheStep(), kwargs=cache_inputs(2, 3, 4), path=tmp_path / "step.onnx", **CACHE_NAMES,
                    dynamic_shapes=CACHE_SHAPES, validation_inputs=[bad])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("metadata,error", [({"miss_compile.version": "9"}, ValueError), ({"task": 3}, TypeError)])
def test_metadata_refusals(tmp_path, metadata, error):
    with pytest.raises(error, match="metadata"):
        export_onnx(Doubler(), kwargs={"x": torch.randn(2, 4, 3), "attention_mask": torch.ones(2, 4)},
                    path=tmp_path / "d.onnx", metadata=metadata)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("names,error", [
    (dict(input_names=["input_ids", "attention_mask", "position_ids"]), r"input_names has 3 names \(3 distinct\) for 5 tensors"),
    (dict(output_names=["logits", "logits", "present.1.key"]), r"output_names has 3 names \(2 distinct\) for its outputs"),
    (dict(output_names=["logits"]), r"output_names has 1 names \(1 distinct\) for 3 outputs of the traced graph"),
])
def test_names_that_do_not_fit_are_refused(tmp_path, names, error):
    with pytest.raises(ValueError, match=error):
        export_onnx(CacheStep(), kwargs=cache_inputs(2, 3, 4), path=tmp_path / "step.onnx", dynamic_shapes=CACHE_SHAPES,
                    **names)
    assert not list(tmp_path.iterdir())


def test_a_mask_and_token_types_left_out_mean_no_padding(bert, tmp_path):
    """transformers' defaults (all ones, type 0) where the graph's mask has the ids' shape; a KV-cache mask
    over past + current is never filled in."""
    model, result = bert
    ids = input_ids(3, 6, seed=8)
    (got, _) = load_session(result.path, device="cpu").run({"input_ids": ids})
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
    assert (got - want).abs().max().item() < 1e-4
    step = export_onnx(CacheStep(), kwargs=cache_inputs(2, 3, 4), path=tmp_path / "step.onnx", **CACHE_NAMES,
                       dynamic_shapes=CACHE_SHAPES, validate=False)
    feeds = cache_inputs(2, 3, 4)
    pasts = feeds.pop("past_key_values")
    del feeds["attention_mask"]
    with pytest.raises(Exception, match="attention_mask"):
        load_session(step.path, device="cpu").run({**feeds, "past_key_values.0.key": pasts[0],
                                                   "past_key_values.1.key": pasts[1]})


def test_a_padded_bert_batch_through_the_cli_equals_torch_with_the_mask(tmp_path, capsys):
    """miss-export BASE --adapter DIR -o OUT: the graph takes BERT's attention_mask and token_type_ids."""
    model = adapted("bert")
    build("bert").save_pretrained(tmp_path / "base")
    save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "out" / "model.onnx"
    assert main([str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "-o", str(out)]) == 0
    capsys.readouterr()
    session = load_session(out, device="cpu")
    assert session.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert session.output_names == ["last_hidden_state", "pooler_output"]
    ids, mask = input_ids(4, 10, seed=9), padded_mask(4, 10, "left")
    types = torch.zeros_like(ids)
    got, _ = session.run({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert_equal_at_real_tokens(got, want, mask)
