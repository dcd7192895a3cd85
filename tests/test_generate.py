"""KV-cache exports (export_causal_lm) and session.generate against transformers' generate.

Each (model, merged) graph is exported once (module-scoped). References: PEFT's MiSS model for
Llama and Qwen2 (grouped kv heads: 4 heads, 2 kv heads), ours for GPT-2 (PEFT's MiSS does not adapt
Conv1D); blocks are random, so the adapter changes the tokens.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import peft
import pytest
import torch
import transformers
from helpers import VOCAB, build, randomize_blocks

from miss_compile import MissConfig, adapters_disabled, apply_miss, save_adapter, set_active_adapters
from miss_compile.export import export_causal_lm, export_onnx, load_session, write_onnx_adapter
from miss_compile.export.causal_lm import past_name, positions_from_mask, present_name
from miss_compile.stacked import adapter_ids_for, stack_adapters

NEW_TOKENS = 24
EOS, PAD = 2, 0
EXPORTS = [(name, merged) for name in ("llama", "qwen2", "gpt2") for merged in (False, True)]


def adapted(name: str, seed: int) -> torch.nn.Module:
    """The tiny model with one MiSS adapter of random blocks (`seed`); the base weights are the same for every seed."""
    if name == "gpt2":
        model = apply_miss(build(name), MissConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"]))
    else:
        model = peft.get_peft_model(build(name), peft.MissConfig(r=4, target_modules="all-linear"))
    randomize_blocks(model, seed=seed)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(name, merged) -> (graph path, the exported model, a second adapter's model); exported once each."""
    cache: dict = {}

    def get(name: str, merged: bool):
        if (name, merged) not in cache:
            model = adapted(name, seed=2)
            path = tmp_path_factory.mktemp(f"{name}-{'merged' if merged else 'unmerged'}") / "model.onnx"
            if merged:
                export_causal_lm(model, path, merged=True)
            else:  # the same export through export_onnx's with_past=True
                export_onnx(model, path=path, merged=False, with_past=True)
            cache[name, merged] = path, model, adapted(name, seed=3)
        return cache[name, merged]

    return get


def prompts(lengths: list[int], seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask [len(lengths), max(lengths)], tokens from 3 up (not PAD or EOS)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(3, VOCAB, (length,), generator=generator)
        mask[row, width - length:] = 1
    return ids, mask


@torch.no_grad()
def reference(model, ids, mask, **settings):
    settings = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": PAD, "eos_token_id": EOS, **settings}
    return model.generate(input_ids=ids, attention_mask=mask, **settings)


@pytest.mark.parametrize("name, merged", EXPORTS)
def test_greedy_tokens_equal_transformers(exported, name, merged):
    path, model, _ = exported(name, merged)
    session = load_session(path, device="cpu")
    for lengths in ([6], [7, 4, 2]):  # batch 1; a left-padded batch of 3 prompts of different lengths
        ids, mask = prompts(lengths)
        expected = reference(model, ids, mask)
        assert expected.shape[1] == ids.shape[1] + NEW_TOKENS  # no early stop: all 24 tokens compared
        got = session.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=EOS, pad_token_id=PAD)
        assert torch.equal(got, expected), f"{name} merged={merged} prompts {lengths}:\n{got}\n{expected}"


def test_eos_stops_each_row(exported):
    """A row that produces eos is padded from then on; the others go on (transformers' rule)."""
    path, model, _ = exported("llama", False)
    session = load_session(path, device="cpu")
    ids, mask = prompts([7, 4, 2])
    free = reference(model, ids, mask, eos_token_id=None)
    eos = int(free[0, ids.shape[1] + 3])  # row 0's 4th new token: row 0 stops there
    expected = reference(model, ids, mask, eos_token_id=eos)
    got = session.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=PAD)
    assert (expected[0, ids.shape[1] + 4:] == PAD).all()
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_swapped_adapter_gives_its_tokens(exported, name, tmp_path):
    path, model, other = exported(name, False)
    adapter = write_onnx_adapter(other, tmp_path / "other.onnx_adapter", model_path=path)
    session = load_session(path, device="cpu")
    ids, mask = prompts([7, 4, 2])
    expected = reference(other, ids, mask)
    assert not torch.equal(expected, reference(model, ids, mask))  # the adapters differ in their tokens
    got = session.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=EOS, pad_token_id=PAD,
                           adapter=adapter)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name, merged", EXPORTS)
@torch.no_grad()
def test_step_logits_equal_torch(exported, name, merged):
    """Prefill (past length 0, left-padded) and five decode steps (sequence length 1): each step's logits
    against PyTorch's forward on the whole sequence without a cache, within 1e-4 (fp32)."""
    path, model, _ = exported(name, merged)
    session = load_session(path, device="cpu")
    names = [i.name for i in session.session.get_inputs()]
    layers = sum(name.startswith("past_key_values.") for name in names) // 2
    _, kv_heads, _, head_dim = session.session.get_inputs()[names.index(past_name(0, "key"))].shape
    ids, mask = prompts([7, 4, 2])
    past = {past_name(i, kind): torch.zeros(3, kv_heads, 0, head_dim) for i in range(layers) for kind in ("key", "value")}
    step_ids, tokens = ids, ids
    for step in range(6):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        feeds = {"input_ids": step_ids, "attention_mask": mask, **past}
        if "position_ids" in names:
            feeds["position_ids"] = positions[:, -step_ids.shape[1]:]
        outputs = dict(zip(session.output_names, session.run(feeds), strict=True))
        expected = model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=False).logits
        expected = expected[:, -step_ids.shape[1]:]
        keep = mask[:, -step_ids.shape[1]:].bool()
        error = (outputs["logits"] - expected)[keep].abs().max().item()
        assert error < 1e-4, f"{name} merged={merged} step {step}: logits differ by {error:.3g}"
        assert outputs[present_name(0, "key")].shape[2] == tokens.shape[1]
        past = {past_name(i, kind): outputs[present_name(i, kind)] for i in range(layers) for kind in ("key", "value")}
        step_ids = outputs["logits"][:, -1:].argmax(-1)
        tokens = torch.cat([tokens, step_ids], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)


@pytest.fixture(scope="module")
def head_trained(tmp_path_factory):
    """A PEFT Llama adapter that trains lm_head too (modules_to_save), with an eos in its generation_config
    that row 0 of prompts([7, 4, 2]) produces as its 4th new token; exported unmerged with past."""
    model = peft.get_peft_model(build("llama"), peft.MissConfig(r=4, target_modules="all-linear",
                                                                modules_to_save=["lm_head"]))
    randomize_blocks(model, seed=4)
    head = model.base_model.model.lm_head.modules_to_save["default"]
    with torch.no_grad():
        head.weight.add_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(6)))
    model.eval()
    ids, mask = prompts([7, 4, 2])
    free = reference(model, ids, mask, eos_token_id=None)
    model.generation_config.eos_token_id = int(free[0, ids.shape[1] + 3])
    model.generation_config.pad_token_id = PAD
    path = tmp_path_factory.mktemp("head-trained") / "model.onnx"
    export_causal_lm(model, path, merged=False)
    return path, model, free


def test_generate_stops_at_the_models_own_eos_given_in_any_integer_form(head_trained):
    """No eos_token_id: the model's generation_config eos and pad, recorded at export, as transformers'
    generate uses them; numpy ints and tensors are ids too; [] stops at no token."""
    path, model, free = head_trained
    session = load_session(path, device="cpu")
    ids, mask = prompts([7, 4, 2])
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    eos = model.generation_config.eos_token_id
    assert (expected[0, ids.shape[1] + 4:] == PAD).all() and not torch.equal(expected, free)  # the eos bites
    assert torch.equal(session.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS), expected)
    for form in (np.int64(eos), torch.tensor(eos), [torch.tensor(eos)], torch.tensor([eos])):
        got = session.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=form)
        assert torch.equal(got, expected), type(form)
    assert torch.equal(session.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=[]), free)


def test_a_graph_holding_trained_heads_refuses_adapter_files(head_trained, tmp_path):
    """The graph's lm_head is the adapter's trained copy: another adapter's blocks would run with it
    (a silent wrong result), so no adapter file is written for it or run on it."""
    path, _, _ = head_trained
    metadata = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert json.loads(metadata["miss_compile.modules_to_save"]) == {"lm_head": "default"}
    assert metadata["miss_compile.base_model"] == "LlamaForCausalLM"
    other = adapted("llama", seed=3)  # blocks only: fits the graph's blocks
    with pytest.raises(ValueError, match=r"write_onnx_adapter: .*model.onnx was exported with adapter 'default', "
                                         r"which trains whole modules too \(modules_to_save: \['lm_head'\]\)"):
        write_onnx_adapter(other, tmp_path / "checked.onnx_adapter", model_path=path)
    assert not (tmp_path / "checked.onnx_adapter").exists()
    unchecked = write_onnx_adapter(other, tmp_path / "unchecked.onnx_adapter")  # no graph to check against
    session = load_session(path, device="cpu")
    ids, mask = prompts([5])
    for call in (lambda: session.generate(ids, attention_mask=mask, adapter=unchecked),
                 lambda: session.load_adapter(unchecked),
                 lambda: session.generate(ids, attention_mask=mask, adapter=ort.LoraAdapter())):
        with pytest.raises(ValueError, match=r"adapter files are refused: this session's graph .*lm_head"):
            call()


def test_bad_ids_are_refused_by_name(head_trained):
    path, _, _ = head_trained
    session = load_session(path, device="cpu")
    ids, mask = prompts([5])
    for eos in ("2", [[15]], 2.0, True):
        with pytest.raises(TypeError, match=r"eos_token_id must be an integer token id or a flat list of them"):
            session.generate(ids, attention_mask=mask, eos_token_id=eos)
    with pytest.raises(ValueError, match=r"pad_token_id must be one id, got \[\]"):
        session.generate(ids, attention_mask=mask, pad_token_id=[])
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['top_k'\].*'repetition_penalty'"):
        session.generate(ids, attention_mask=mask, top_k=5)


def test_a_graph_exported_before_the_record_warns_that_heads_are_unchecked(head_trained, tmp_path, caplog):
    """Older graphs carry no modules_to_save record: an adapter file is still run, with one warning."""
    path, _, _ = head_trained
    graph = onnx.load(str(path))
    kept = [p for p in graph.metadata_props if p.key != "miss_compile.modules_to_save"]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    older = tmp_path / "older.onnx"
    onnx.save(graph, str(older))
    file = write_onnx_adapter(adapted("llama", seed=3), tmp_path / "other.onnx_adapter")
    session = load_session(older, device="cpu")
    with caplog.at_level(logging.WARNING, logger="miss_compile.export.runtime"):
        session.load_adapter(file)
        session.load_adapter(file)
    assert caplog.text.count("was exported before graphs recorded the modules their adapter trains whole") == 1


@pytest.fixture(scope="module")
def with_settings(tmp_path_factory):
    """A merged Llama whose generation_config changes greedy tokens the way shipped models do."""
    model = adapted("llama", seed=2)
    settings = {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "min_new_tokens": 6,
                "suppress_tokens": [5, 9], "begin_suppress_tokens": [7], "bad_words_ids": [[11, 12]]}
    model.generation_config.update(**settings, eos_token_id=EOS, pad_token_id=PAD)
    path = tmp_path_factory.mktemp("settings") / "model.onnx"
    export_causal_lm(model, path, merged=True)
    return path, model, settings


def test_generation_config_settings_are_applied_as_transformers_applies_them(with_settings):
    path, model, settings = with_settings
    metadata = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    recorded = json.loads(metadata["miss_compile.generation"])
    assert recorded == {"eos_token_id": EOS, "pad_token_id": PAD, "bos_token_id": model.generation_config.bos_token_id,
                        "settings": settings}
    session = load_session(path, device="cpu")
    for lengths in ([6], [7, 4, 2]):
        ids, mask = prompts(lengths)
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert not torch.equal(expected, reference(model, ids, mask, repetition_penalty=1.0, no_repeat_ngram_size=0,
                                                   suppress_tokens=None, bad_words_ids=None))  # the settings bite
        assert torch.equal(session.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS), expected)
        overridden = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                    repetition_penalty=1.1, no_repeat_ngram_size=3)
        got = session.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, repetition_penalty=1.1,
                               no_repeat_ngram_size=3)
        assert torch.equal(got, overridden)


def test_settings_generate_cannot_apply_are_refused_by_name():
    from miss_compile.export.greedy import greedy_settings, logits_processors

    config = transformers.GenerationConfig(sequence_bias={(3,): 1.0}, repetition_penalty=1.2)
    settings = greedy_settings(config)
    assert settings == {"repetition_penalty": 1.2, "refused": ["sequence_bias"]}
    with pytest.raises(NotImplementedError, match=r"generation_config sets \['sequence_bias'\].*set them to None"):
        logits_processors(settings, torch.tensor([EOS]), torch.ones(1, 3, dtype=torch.long), 4)


def test_eos_and_pad_come_from_generation_config_as_in_transformers():
    """transformers 5 reads the ids from generation_config only: config.json's eos does not stop it."""
    from miss_compile.export.provenance import generation_ids

    model = build("llama")
    model.config.eos_token_id, model.config.pad_token_id = 15, 9
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = None
    assert generation_ids(model)["eos_token_id"] is None and generation_ids(model)["pad_token_id"] is None


def test_an_adapter_trained_on_another_class_is_written_with_a_warning(exported, tmp_path, caplog):
    """A Qwen2 adapter fits a Llama graph of the same sizes: written, and said (as load_adapter says it)."""
    path, _, _ = exported("llama", False)
    qwen2 = adapted("qwen2", seed=3)
    save_adapter(qwen2, tmp_path / "qwen2-adapter")
    for source in (qwen2, tmp_path / "qwen2-adapter"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="miss_compile.export.adapters"):
            write_onnx_adapter(source, tmp_path / "qwen2.onnx_adapter", model_path=path)
        assert "trained on a Qwen2ForCausalLM and is written for" in caplog.text
        assert "exported from a LlamaForCausalLM" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="miss_compile.export.adapters"):
        write_onnx_adapter(adapted("llama", seed=3), tmp_path / "llama.onnx_adapter", model_path=path)
    assert "trained on" not in caplog.text


def test_refuses_an_encoder_before_writing(tmp_path):
    path = tmp_path / "bert.onnx"
    with pytest.raises(ValueError, match=r"BertModel is not a decoder-only causal LM with a KV cache.*Llama, Qwen2"):
        export_causal_lm(build("bert"), path)
    assert not list(tmp_path.iterdir())


def test_with_past_refuses_inputs_it_builds_itself(tmp_path):
    with pytest.raises(ValueError, match=r"with_past=True\) builds the KV-cache graph's inputs itself"):
        export_onnx(build("llama"), (torch.ones(1, 3, dtype=torch.long),), path=tmp_path / "m.onnx", with_past=True)
    with pytest.raises(ValueError, match=r"BertModel is not a decoder-only causal LM"):
        export_onnx(build("bert"), path=tmp_path / "m.onnx", with_past=True)
    assert not list(tmp_path.iterdir())


def test_io_binding_generates_the_same_tokens(exported):
    """The IO-binding path (every CUDA session; here on the CPU): the presents are fed back as bound tensors."""
    path, model, _ = exported("llama", False)
    ids, mask = prompts([7, 4, 2])
    got = load_session(path, device="cpu", io_binding=True).generate(
        ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(got, reference(model, ids, mask))


def test_sampling_and_right_padding_are_refused_by_name(exported):
    path, _, _ = exported("llama", True)
    session = load_session(path, device="cpu")
    ids, mask = prompts([3, 2])
    with pytest.raises(NotImplementedError, match="greedy.*onnxruntime-genai"):
        session.generate(ids, attention_mask=mask, do_sample=True)
    with pytest.raises(ValueError, match="a prompt ends with padding.*padding_side = 'left'"):
        session.generate(ids, attention_mask=mask.flip(-1))


@pytest.mark.slow
def test_mistral_tokens_equal_transformers(tmp_path):
    model = adapted("mistral", seed=2)
    export_causal_lm(model, tmp_path / "model.onnx")
    ids, mask = prompts([7, 4, 2])
    got = load_session(tmp_path / "model.onnx", device="cpu").generate(
        ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(got, reference(model, ids, mask))


@pytest.mark.slow
@torch.no_grad()
def test_stacked_rows_take_their_adapters(tmp_path):
    """adapter_ids [batch] picks one adapter per row at every step; -1 is the base model."""
    model = build("llama")
    for seed, name in enumerate(["a", "b"]):
        apply_miss(model, MissConfig(r=4, target_modules="all-linear"), name)
        randomize_blocks(model, name, seed=10 + seed)
    model = stack_adapters(model)
    export_causal_lm(model, tmp_path / "model.onnx", adapter_ids=torch.tensor([0, 1]))
    ids, mask = prompts([7, 4, 2])
    rows = ["a", "b", None]
    expected = []
    for row, name in enumerate(rows):  # transformers' generate takes no adapter per row: one run per adapter
        if name is None:
            with adapters_disabled(model):
                expected.append(reference(model, ids, mask)[row])
        else:
            set_active_adapters(model, name)
            expected.append(reference(model, ids, mask)[row])
    got = load_session(tmp_path / "model.onnx", device="cpu").generate(
        ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=EOS, pad_token_id=PAD,
        adapter_ids=adapter_ids_for(model, rows))
    assert len({tuple(row.tolist()) for row in expected}) == 3  # each adapter gives other tokens
    assert torch.equal(got, torch.stack(expected))


@pytest.mark.slow
def test_graph_without_cache_recomputes_each_step(tmp_path):
    """A plain export (no past inputs) generates the same tokens, running the whole sequence per step."""
    model = adapted("llama", seed=2)
    ids, mask = prompts([7, 4, 2])
    export_onnx(model, kwargs={"input_ids": ids, "attention_mask": mask, "position_ids": positions_from_mask(mask)},
                path=tmp_path / "model.onnx", merged=True)
    session = load_session(tmp_path / "model.onnx", device="cpu")
    assert not any(name.startswith("past_key_values.") for name in session.input_names)
    got = session.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(got, reference(model, ids, mask))
