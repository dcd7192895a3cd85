"""modules_to_save (the classifier head of every SEQ_CLS run) saved, loaded, compiled and exported with
PEFT's keys and numbers: `base_model.model.score.weight`, the trained head in every path."""

import json

import peft
import pytest
import torch
import transformers
from helpers import DECODER, VOCAB, clone, input_ids, randomize_blocks
from safetensors.torch import load_file, save_file

from miss_compile import MissConfig, apply_miss, load_adapter, save_adapter
from miss_compile.checkpoint import read_adapter, read_checkpoint
from miss_compile.modules_to_save import wrap_modules_to_save
from miss_compile.peft_compat import from_peft, named_miss_layers
from miss_compile.saved_modules import SavedModule, saved_module_wrappers

LABELS = 3


def llama_classifier() -> torch.nn.Module:
    config = transformers.LlamaConfig(**DECODER, num_labels=LABELS, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(config)


def bert_classifier() -> torch.nn.Module:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, num_labels=LABELS)
    return transformers.BertForSequenceClassification(config)


CLASSIFIERS = {"llama": (llama_classifier, "score"), "bert": (bert_classifier, "classifier")}
TARGETS = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}


def classifier(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return CLASSIFIERS[name][0]().eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@torch.no_grad()
def train_heads(model, adapter_name="default", seed=3):
    """Stand-in for training: the adapter's head copies move away from the original."""
    generator = torch.Generator().manual_seed(seed)
    for wrapper in saved_module_wrappers(getattr(model, "base_model", model).model
                                         if isinstance(model, peft.PeftModel) else model).values():
        for param in wrapper.modules_to_save[adapter_name].parameters():
            param.add_(torch.randn(param.shape, generator=generator))


def peft_classifier(name):
    """A trained PEFT SEQ_CLS MiSS model: PEFT adds the head to modules_to_save by itself."""
    base = classifier(name)
    theirs = peft.get_peft_model(clone(base), peft.MissConfig(r=4, target_modules=TARGETS[name], task_type="SEQ_CLS"))
    randomize_blocks(theirs)
    train_heads(theirs)
    return base, theirs.eval()


def our_classifier(name):
    """Ours with the head in modules_to_save (apply_miss wraps it; calling wrap_modules_to_save again is a
    no-op, checked here)."""
    base = classifier(name)
    config = MissConfig(r=4, target_modules=TARGETS[name], modules_to_save=[CLASSIFIERS[name][1]])
    ours = apply_miss(clone(base), config)
    wrap_modules_to_save(ours, config, "default")
    randomize_blocks(ours)
    train_heads(ours)
    return base, ours


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_peft_checkpoint_with_head_loads_in_ours(tmp_path, name):
    base, theirs = peft_classifier(name)
    theirs.save_pretrained(tmp_path)
    head = CLASSIFIERS[name][1]
    assert f"base_model.model.{head}.weight" in load_file(tmp_path / "adapter_model.safetensors")
    ours = load_adapter(clone(base), tmp_path)
    assert isinstance(getattr(ours, head), SavedModule)
    ids = input_ids()
    expected = logits(theirs, ids)
    assert not torch.allclose(expected, logits(base, ids), atol=1e-3)  # the trained head matters
    torch.testing.assert_close(logits(ours, ids), expected, atol=1e-5, rtol=1e-5)
    # the original head stays for "adapters disabled", untouched and frozen
    assert torch.equal(getattr(ours, head).original_module.weight, getattr(base, head).weight)
    assert not getattr(ours, head).original_module.weight.requires_grad
    assert getattr(ours, head).modules_to_save["default"].weight.requires_grad


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_our_checkpoint_with_head_loads_in_peft(tmp_path, name):
    base, ours = our_classifier(name)
    save_adapter(ours, tmp_path)
    head = CLASSIFIERS[name][1]
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert {f"base_model.model.{head}.weight", f"base_model.model.{head}.bias"} <= keys or \
        f"base_model.model.{head}.weight" in keys
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == [head]
    theirs = peft.PeftModel.from_pretrained(clone(base), tmp_path).eval()
    ids = input_ids()
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), atol=1e-5, rtol=1e-5)
    again = load_adapter(clone(base), tmp_path)
    torch.testing.assert_close(logits(again, ids), logits(ours, ids), atol=0, rtol=0)


def test_head_loads_into_a_live_peft_model_as_a_second_adapter(tmp_path):
    base, theirs = peft_classifier("llama")
    theirs.save_pretrained(tmp_path)
    live = peft.get_peft_model(clone(base), peft.MissConfig(r=4, target_modules=TARGETS["llama"], task_type="SEQ_CLS"))
    load_adapter(live, tmp_path, adapter_name="trained")
    live.set_adapter("trained")
    ids = input_ids()
    torch.testing.assert_close(logits(live.eval(), ids), logits(theirs, ids), atol=1e-5, rtol=1e-5)


def test_peft_adapter_without_head_copy_is_refused(tmp_path):
    base, theirs = peft_classifier("llama")
    theirs.save_pretrained(tmp_path)
    live = peft.get_peft_model(clone(base), peft.MissConfig(r=4, target_modules=TARGETS["llama"])).eval()
    with pytest.raises(ValueError, match=r"the PEFT model's adapter 'default' has no modules_to_save copy of "
                                         r"\['score'\]; .* load into a new adapter_name"):
        load_adapter(live, tmp_path)
    assert isinstance(live.base_model.model.score, torch.nn.Linear)


def test_live_peft_model_saves_its_head(tmp_path):
    base, theirs = peft_classifier("llama")
    save_adapter(theirs, tmp_path)
    ours_file = load_file(tmp_path / "adapter_model.safetensors")
    theirs.save_pretrained(tmp_path / "peft")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ours_file.keys() == peft_file.keys()
    for key, value in peft_file.items():
        assert torch.equal(ours_file[key], value), key
    ids = input_ids()
    again = peft.PeftModel.from_pretrained(clone(base), tmp_path).eval()
    torch.testing.assert_close(logits(again, ids), logits(theirs, ids), atol=1e-5, rtol=1e-5)


def test_distributed_helpers_carry_the_head(tmp_path):
    from miss_compile.distributed import load_adapter_sharded, save_adapter_distributed, trainable_blocks

    base, theirs = peft_classifier("llama")
    assert len(trainable_blocks(theirs)) == 5  # four blocks and the head copy: DDP / FSDP2 reduce all of them
    save_adapter_distributed(theirs, tmp_path)  # no process group: this process writes
    theirs.save_pretrained(tmp_path / "peft")
    assert load_file(tmp_path / "adapter_model.safetensors").keys() == \
        load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    fresh = peft.get_peft_model(clone(base), peft.MissConfig(r=4, target_modules=TARGETS["llama"], task_type="SEQ_CLS"))
    load_adapter_sharded(fresh.eval(), tmp_path)
    ids = input_ids()
    torch.testing.assert_close(logits(fresh, ids), logits(theirs, ids), atol=1e-5, rtol=1e-5)


def test_from_peft_carries_the_trained_head():
    _, theirs = peft_classifier("llama")
    converted = from_peft(theirs)
    assert isinstance(converted.score, SavedModule)
    ids = input_ids()
    torch.testing.assert_close(logits(converted, ids), logits(theirs, ids), atol=1e-5, rtol=1e-5)
    with theirs.disable_adapter():
        disabled = logits(theirs, ids)
    for layer in named_miss_layers(converted).values():
        layer.enable_adapters(False)
    converted.score.enable_adapters(False)
    torch.testing.assert_close(logits(converted, ids), disabled, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["peft", "ours"])
def test_compiled_classifier_matches_eager(kind):
    from miss_compile import explain, miss_backend

    _, model = peft_classifier("llama") if kind == "peft" else our_classifier("llama")
    ids = input_ids()
    expected = logits(model, ids)
    compiled = torch.compile(model, backend=miss_backend)
    torch.testing.assert_close(logits(compiled, ids), expected, atol=1e-5, rtol=1e-5)
    assert len(explain(model, input_ids=ids).rewritten) == 4  # every adapted Linear still became a MiSS op


@pytest.mark.slow
@pytest.mark.parametrize("merged", [True, False], ids=["merged", "unmerged"])
@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_export_keeps_the_trained_head(tmp_path, name, merged):
    from miss_compile.export import export_onnx, load_session

    _, theirs = peft_classifier(name)
    result = export_onnx(theirs, kwargs={"input_ids": input_ids()}, path=tmp_path / "m.onnx", merged=merged)
    ids = input_ids(3, 5, seed=6)
    (onnx_logits,) = load_session(result.path, device="cpu").run({"input_ids": ids})[:1]
    torch.testing.assert_close(torch.as_tensor(onnx_logits), logits(theirs, ids), atol=1e-4, rtol=1e-4)


# --- refused, named, model untouched


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m).__name__ for m in model.modules()]


def _damage(directory, edit):
    path = directory / "adapter_model.safetensors"
    weights = dict(load_file(path))
    edit(weights)
    save_file(weights, path)


BAD_HEADS = {
    "head shape": (lambda w: w.update({"base_model.model.score.weight": torch.zeros(5, 32)}),
                   r"base_model.model.score.weight: shape \(5, 32\) in the file, \(3, 32\) in the model"),
    "head missing": (lambda w: w.pop("base_model.model.score.weight"),
                     r"the model trains modules_to_save tensors the file lacks: \['base_model.model.score.weight'\]"),
    "extra tensor": (lambda w: w.update({"base_model.model.score.bias": torch.zeros(3)}),
                     r"modules_to_save tensors for no module .* \['base_model.model.score.bias'\]"),
    "head overflows fp16": (lambda w: w["base_model.model.score.weight"].__setitem__((0, 0), 1e6),
                            r"base_model.model.score.weight: 1 of 96 values .* overflow the model's torch.float16"),
}


@pytest.mark.parametrize("case", list(BAD_HEADS))
def test_bad_head_is_named_and_model_untouched(tmp_path, case):
    _, theirs = peft_classifier("llama")
    theirs.save_pretrained(tmp_path)
    edit, message = BAD_HEADS[case]
    _damage(tmp_path, edit)
    model = classifier("llama")
    if "fp16" in case:
        model = model.half()
    before = _state(model)
    with pytest.raises(ValueError, match=message):
        load_adapter(model, tmp_path, check_finite=True)
    after = _state(model)
    assert after[1] == before[1] and not named_miss_layers(model)
    assert all(torch.equal(after[0][k], v) for k, v in before[0].items())
    assert all(p.requires_grad for p in model.parameters())


def test_blocks_only_reader_refuses_a_checkpoint_with_heads(tmp_path):
    _, theirs = peft_classifier("llama")
    theirs.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"also holds modules_to_save tensors \['score.weight'\]"):
        read_adapter(tmp_path)
    assert read_checkpoint(tmp_path).saved.keys() == {"score.weight"}


def test_head_without_modules_to_save_in_config_is_refused(tmp_path):
    _, theirs = peft_classifier("llama")
    theirs.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "modules_to_save": None}))
    with pytest.raises(ValueError, match=r"keys that are not MiSS blocks .* nor tensors of modules_to_save=None: "
                                         r"\['base_model.model.score.weight'\]"):
        load_adapter(classifier("llama"), tmp_path)


# --- the verbs (apply_miss, set_active_adapters, adapters_disabled) on models with heads


def test_apply_miss_gives_the_adapter_a_trainable_head():
    config = MissConfig(r=4, target_modules=TARGETS["llama"], modules_to_save=["score"])
    model = apply_miss(classifier("llama"), config)
    assert isinstance(model.score, SavedModule)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad and ".miss_block." not in n)
    assert trainable == ["score.modules_to_save.default.weight"]


@pytest.mark.parametrize("kind", ["ours", "peft"])
def test_adapters_disabled_runs_the_original_head(kind):
    from miss_compile import adapters_disabled

    base, model = our_classifier("llama") if kind == "ours" else peft_classifier("llama")
    ids = input_ids()
    with adapters_disabled(model):
        torch.testing.assert_close(logits(model, ids), logits(base, ids), atol=1e-5, rtol=1e-5)


def test_each_adapter_runs_its_own_head(tmp_path):
    from miss_compile import set_active_adapters

    base, ours = our_classifier("llama")
    save_adapter(ours, tmp_path / "first")
    config = MissConfig(r=4, target_modules=TARGETS["llama"], modules_to_save=["score"])
    apply_miss(ours, config, adapter_name="second")
    randomize_blocks(ours, "second", seed=9)
    train_heads(ours, "second", seed=9)
    ids = input_ids()
    first = logits(load_adapter(clone(base), tmp_path / "first"), ids)
    torch.testing.assert_close(logits(ours, ids), first, atol=1e-5, rtol=1e-5)
    set_active_adapters(ours, "second")
    save_adapter(ours, tmp_path / "second", adapter_name="second")
    second = logits(peft.PeftModel.from_pretrained(clone(base), tmp_path / "second").eval(), ids)
    torch.testing.assert_close(logits(ours, ids), second, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"adapters \['default', 'second'\] each train their own copy of 'score'"):
        set_active_adapters(ours, ["default", "second"])
    torch.testing.assert_close(logits(ours, ids), second, atol=1e-5, rtol=1e-5)  # refused: nothing changed


def test_per_row_selection_refuses_models_with_heads():
    from miss_compile.saved_modules import refuse_per_row_selection

    _, theirs = peft_classifier("llama")
    with pytest.raises(ValueError, match=r"stack_adapters: adapters train their own copies of \{'score': \['default'\]\} "
                                         r"\(modules_to_save\), and one batch runs one copy for every row"):
        refuse_per_row_selection(from_peft(theirs), "stack_adapters")
    refuse_per_row_selection(classifier("llama"), "stack_adapters")  # no heads: nothing to refuse


def test_stack_adapters_refuses_a_model_with_heads():
    from miss_compile import stack_adapters

    _, theirs = peft_classifier("llama")
    with pytest.raises(ValueError, match=r"stack_adapters: adapters train their own copies of \{'score'"):
        stack_adapters(theirs)


def test_onnx_adapter_file_refuses_an_adapter_with_heads(tmp_path):
    """A graph keeps heads as plain weights: a file of blocks alone would run the exported head."""
    from miss_compile.export import write_onnx_adapter

    _, ours = our_classifier("llama")
    with pytest.raises(ValueError, match=r"trains whole modules too \(modules_to_save: .*score.*export one graph"):
        write_onnx_adapter(ours, tmp_path / "head.onnx_adapter")
    assert not list(tmp_path.iterdir())
