"""to_lora: balance / mini MiSS adapters as PEFT LoRA checkpoints that give the MiSS model's numbers
(`PeftModel.from_pretrained(base, converted)`), on tiny models from configs; bat and every inexact
case refused naming the layer, with nothing written."""

import json
import logging

import peft
import pytest
import torch
import transformers
from helpers import DECODER, VOCAB, build, input_ids, model_output, randomize_blocks
from safetensors.torch import load_file

from miss_compile import MissConfig, apply_miss, save_adapter, set_active_adapters, to_lora
from miss_compile.export.cli import main
from miss_compile.lora import lora_factors
from miss_compile.reference import chunk_sum, expand_block

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

# (model, variant, r, mini_r, dtype): in % r != 0 for r = 3 (hidden 32) and r = 16 (GPT-2's 4 * 32 is
# fine, Llama's 48-wide down_proj is not), mini_r dividing every out_features of the model.
CASES = [
    ("llama", "balance", 3, 1, torch.float32),
    ("llama", "mini", 8, 4, torch.float32),
    ("llama", "balance", 16, 1, torch.bfloat16),
    ("qwen2", "balance", 1, 1, torch.float32),
    ("qwen2", "mini", 3, 16, torch.bfloat16),
    ("gpt2", "balance", 3, 1, torch.float32),
    ("gpt2", "mini", 16, 8, torch.float32),
    ("bert", "balance", 8, 1, torch.float32),
    ("bert", "mini", 3, 16, torch.float32),
]


def adapted(name, variant, r, mini_r=1, dtype=torch.float32, adapter_name="default", targets="all-linear", model=None):
    model = build(name, dtype) if model is None else model
    apply_miss(model, MissConfig(r=r, variant=variant, mini_r=mini_r, target_modules=targets), adapter_name)
    randomize_blocks(model, adapter_name, seed=sum(map(ord, adapter_name)))
    return model


def lora_model(name, folder, dtype=torch.float32, adapter_name="default"):
    return peft.PeftModel.from_pretrained(build(name, dtype), folder, adapter_name=adapter_name).eval()


def assert_same_outputs(ours, theirs, dtype=torch.float32):
    ids = input_ids()
    with torch.no_grad():
        expected, got = model_output(ours, ids), model_output(theirs, ids)
        with theirs.disable_adapter():
            base = model_output(theirs, ids)
    assert (expected.float() - got.float()).abs().max().item() <= TOLERANCE[dtype]
    assert (expected.float() - base.float()).abs().max().item() > 10 * TOLERANCE[dtype]  # the adapter did something


@pytest.mark.parametrize("in_features", [5, 32, 33])
@pytest.mark.parametrize("variant, r, mini_r", [("balance", 1, 1), ("balance", 3, 1), ("mini", 4, 2), ("balance", 5, 1)])
def test_factors_are_the_chunk_sum(in_features, variant, r, mini_r):
    out_features = 6
    block = torch.randn((r, out_features) if variant == "balance" else (r, mini_r), dtype=torch.float64)
    lora_a, lora_b = lora_factors(block, variant, in_features, out_features)
    assert lora_a.shape == (r, in_features) and lora_b.shape == (out_features, r)
    assert set(lora_a.unique().tolist()) <= {0.0, 1.0}
    x = torch.randn(4, in_features, dtype=torch.float64)
    expected = chunk_sum(x, r) @ expand_block(block, variant, out_features)
    torch.testing.assert_close(x @ lora_a.t() @ lora_b.t(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, variant, r, mini_r, dtype", CASES,
                         ids=[f"{c[0]}-{c[1]}-r{c[2]}-{str(c[4])[6:]}" for c in CASES])
def test_lora_gives_the_miss_outputs(tmp_path, name, variant, r, mini_r, dtype):
    model = adapted(name, variant, r, mini_r, dtype)
    to_lora(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == ("LORA", r, r, False)
    assert config["rank_pattern"] == {} and config["fan_in_fan_out"] == (name == "gpt2")
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert_same_outputs(model, lora_model(name, tmp_path, dtype), dtype)


def test_trained_adapter_from_a_peft_miss_model_and_its_folder(tmp_path):
    """A live PEFT MiSS model after real SGD steps, and the folder it saves (read against the base)."""
    base = build("llama")
    model = peft.get_peft_model(build("llama"), peft.MissConfig(r=3, target_modules=["q_proj", "v_proj", "down_proj"]))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = input_ids()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert all(layer.miss_block["default"].abs().sum() > 0 for layer in peft_miss_layers(model))
    to_lora(model, tmp_path / "from_model")
    assert_same_outputs(model, lora_model("llama", tmp_path / "from_model"))
    model.save_pretrained(tmp_path / "miss")
    to_lora(tmp_path / "miss", tmp_path / "from_folder", base_model=base)
    assert_same_outputs(model, lora_model("llama", tmp_path / "from_folder"))


def peft_miss_layers(model):
    return [m for m in model.modules() if isinstance(m, peft.tuners.miss.MissLayer)]


def test_two_adapters_each_and_combined(tmp_path):
    model = adapted("llama", "balance", 3, adapter_name="a", targets=["q_proj", "v_proj"])
    adapted("llama", "mini", 8, 4, adapter_name="b", model=model)
    to_lora(model, tmp_path / "a", adapter_name="a")
    to_lora(model, tmp_path / "b", adapter_name="b")
    to_lora(model, tmp_path / "ab", combine=["a", "b"])
    theirs = lora_model("llama", tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    for name in ("a", "b"):
        set_active_adapters(model, name)
        theirs.set_adapter(name)
        assert_same_outputs(model, theirs)
    config = json.loads((tmp_path / "ab" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["rank_pattern"] == config["alpha_pattern"]
    assert config["rank_pattern"] == {f"model.layers.{i}.self_attn.{p}": 11 for i in (0, 1) for p in ("q_proj", "v_proj")}
    set_active_adapters(model, ["a", "b"])
    assert_same_outputs(model, lora_model("llama", tmp_path / "ab"))
    to_lora(model, tmp_path / "ab_uniform", combine=["b", "a"], uniform_rank=True)
    config = json.loads((tmp_path / "ab_uniform" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (11, 11, {})
    assert_same_outputs(model, lora_model("llama", tmp_path / "ab_uniform"))


def test_greedy_generation_matches(tmp_path):
    model = adapted("llama", "balance", 3)
    to_lora(model, tmp_path)
    theirs = lora_model("llama", tmp_path)
    prompt = input_ids(batch=1, seq=5)
    settings = dict(do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)  # no early EOS
    with torch.no_grad():
        expected = model.generate(prompt, **settings)
        got = theirs.generate(input_ids=prompt, **settings)
    assert expected.shape[1] == 17
    assert torch.equal(expected, got)


def llama_classifier():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**DECODER, num_labels=3, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(config).eval()


@pytest.mark.parametrize("source", ["ours", "peft"])
def test_seq_cls_head_converts(tmp_path, source):
    if source == "ours":
        model = llama_classifier()
        apply_miss(model, MissConfig(r=3, target_modules=["q_proj", "v_proj"], modules_to_save=["score"]))
        randomize_blocks(model)
        head = model.score.modules_to_save["default"]
    else:
        model = peft.get_peft_model(llama_classifier(), peft.MissConfig(r=3, target_modules=["q_proj", "v_proj"],
                                                                         task_type="SEQ_CLS"))
        for layer in peft_miss_layers(model):
            torch.nn.init.normal_(layer.miss_block["default"], std=0.1)
        head = model.base_model.model.score.modules_to_save["default"]
    with torch.no_grad():
        head.weight.add_(torch.randn(head.weight.shape))
    to_lora(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "score" in config["modules_to_save"]
    assert "base_model.model.score.weight" in load_file(tmp_path / "adapter_model.safetensors")
    theirs = peft.PeftModel.from_pretrained(llama_classifier(), tmp_path).eval()
    ids = input_ids()
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert (expected - got).abs().max().item() <= 1e-5


def bat_model():
    return adapted("llama", "bat", 8, targets=["q_proj"])


def two_dropouts():
    model = build("llama")
    apply_miss(model, MissConfig(r=3, target_modules=["q_proj"]), "a")
    apply_miss(model, MissConfig(r=3, dropout=0.1, target_modules=["v_proj"]), "b")
    return model


def two_heads():
    model = llama_classifier()
    for name in ("a", "b"):
        apply_miss(model, MissConfig(r=3, target_modules=["q_proj"], modules_to_save=["score"]), name)
    return model


# (case, model builder, to_lora keyword arguments, what the message must say)
REFUSALS = [
    ("bat", bat_model, {}, r"model\.layers\.0\.self_attn\.q_proj: adapter 'default' is bat.*depends on the base weight"),
    ("bat-combined", lambda: adapted("llama", "balance", 3, adapter_name="x", model=bat_model()),
     {"combine": ["x", "default"]}, r"model\.layers\.1\.self_attn\.q_proj: adapter 'default' is bat"),
    ("no-such-adapter", bat_model, {"adapter_name": "other"}, r"no layer carries an adapter named 'other'"),
    ("dropouts", two_dropouts, {"combine": ["a", "b"]}, r"different dropouts"),
    ("two-heads", two_heads, {"combine": ["a", "b"]}, r"\['a', 'b'\] each train their own modules_to_save"),
    ("names-list", bat_model, {"adapter_name": ["a", "b"]}, r"pass combine=\[names\]"),
]


@pytest.mark.parametrize("case, make, kwargs, message", REFUSALS, ids=[row[0] for row in REFUSALS])
def test_refused_and_nothing_written(tmp_path, case, make, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        to_lora(make(), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_folder_against_the_wrong_base_is_refused(tmp_path):
    save_adapter(adapted("llama", "balance", 3, targets=["q_proj"]), tmp_path / "miss")
    with pytest.raises(ValueError, match=r"needs the base model"):
        to_lora(tmp_path / "miss", tmp_path / "out")
    wider = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**DECODER, "hidden_size": 64}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: block \(3, 32\).*needs \(3, 64\)"):
        to_lora(tmp_path / "miss", tmp_path / "out", base_model=wider)
    assert not (tmp_path / "out").exists()


def test_cli_to_lora(tmp_path, capsys):
    model = adapted("gpt2", "balance", 3)
    save_adapter(model, tmp_path / "miss")
    build("gpt2").save_pretrained(tmp_path / "base")
    assert main(["to-lora", str(tmp_path / "miss"), "--base", str(tmp_path / "base"), "-o", str(tmp_path / "lora")]) == 0
    assert "LoRA" in capsys.readouterr().out
    assert_same_outputs(model, lora_model("gpt2", tmp_path / "lora"))
    save_adapter(bat_model(), tmp_path / "bat")
    build("llama").save_pretrained(tmp_path / "llama")
    with pytest.raises(SystemExit, match=r"q_proj: adapter 'default' is bat"):
        main(["to-lora", str(tmp_path / "bat"), "--base", str(tmp_path / "llama"), "-o", str(tmp_path / "bat_lora")])
    assert not (tmp_path / "bat_lora").exists()


def test_cli_combines_peft_adapter_subfolders(tmp_path):
    """PEFT's save_pretrained layout: "default" in the folder, other adapters in subfolders."""
    model = adapted("llama", "balance", 3, targets=["q_proj"])
    adapted("llama", "mini", 4, 2, adapter_name="b", model=model)
    save_adapter(model, tmp_path / "miss")
    save_adapter(model, tmp_path / "miss" / "b", adapter_name="b")
    build("llama").save_pretrained(tmp_path / "base")
    argv = ["to-lora", str(tmp_path / "miss"), "--base", str(tmp_path / "base"), "-o"]
    assert main(argv + [str(tmp_path / "b_only"), "--adapter-name", "b"]) == 0
    assert main(argv + [str(tmp_path / "both"), "--combine", "default", "b"]) == 0
    set_active_adapters(model, "b")
    assert_same_outputs(model, lora_model("llama", tmp_path / "b_only"))
    set_active_adapters(model, ["default", "b"])
    assert_same_outputs(model, lora_model("llama", tmp_path / "both"))
    # a name the folder does not hold is refused, not served by the top folder's adapter
    with pytest.raises(ValueError, match=r"holds no adapter named 'c': it holds 'default' \(the top folder\) and \['b'\]"):
        to_lora(tmp_path / "miss", tmp_path / "c_only", adapter_name="c", base_model=tmp_path / "base")
    assert not (tmp_path / "c_only").exists()


def test_a_tied_lm_head_target_warns_that_peft_merging_changes_the_embeddings(tmp_path, caplog):
    """Exact as an adapter (tested), but merge_and_unload adds dW to the weight lm_head shares with the embeddings."""
    model = adapted("gpt2", "balance", 3, targets=["c_attn", "lm_head"])  # GPT-2 ties lm_head to wte
    with caplog.at_level(logging.WARNING, logger="miss_compile.lora"):
        to_lora(model, tmp_path / "tied")
    assert "['lm_head'] share their weight with ['transformer.wte.weight']" in caplog.text
    assert_same_outputs(model, lora_model("gpt2", tmp_path / "tied"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="miss_compile.lora"):
        to_lora(adapted("llama", "balance", 3, targets=["q_proj", "lm_head"]), tmp_path / "untied")
    assert "share their weight" not in caplog.text


def test_peft_folder_with_base_layer_weights_names_the_fix(tmp_path):
    """PEFT saves lm_head's base weights when lm_head is targeted: refused (not dropped), with the re-save."""
    theirs = peft.get_peft_model(build("llama"), peft.MissConfig(r=4, target_modules=["q_proj", "lm_head"]))
    theirs.save_pretrained(tmp_path / "with_base")
    with pytest.raises(ValueError, match=r"lm_head.base_layer.weight.*save_embedding_layers=False"):
        to_lora(tmp_path / "with_base", tmp_path / "lora", base_model=build("llama"))
    randomize_blocks(theirs)
    theirs.save_pretrained(tmp_path / "blocks_only", save_embedding_layers=False)
    to_lora(tmp_path / "blocks_only", tmp_path / "lora", base_model=build("llama"))
    assert_same_outputs(theirs.eval(), lora_model("llama", tmp_path / "lora"))


@pytest.mark.slow
def test_onnxruntime_genai_model_builder_route(tmp_path):
    """MiSS -> to_lora -> onnxruntime-genai's model builder (adapter_path=) -> the MiSS model's greedy tokens.
    Needs onnxruntime-genai, which ./dev installs (--no-deps, beside onnxruntime-gpu)."""
    import subprocess
    import sys

    import onnxruntime_genai as og  # installed by ./dev: the genai folders depend on it
    from tokenizers import Tokenizer, models, pre_tokenizers

    def llama16():  # genai's GroupQueryAttention needs head_size % 16 == 0
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**{**DECODER, "num_attention_heads": 2, "num_key_value_heads": 1})
        return transformers.LlamaForCausalLM(config).eval()

    llama16().save_pretrained(tmp_path / "base")
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", pad_token="t0").save_pretrained(
        tmp_path / "base")
    model = adapted("llama", "balance", 3, model=llama16())
    to_lora(model, tmp_path / "lora")
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(tmp_path / "base"),
                    "-o", str(tmp_path / "genai"), "-p", "fp32", "-e", "cpu", "-c", str(tmp_path / "cache"),
                    "--extra_options", f"adapter_path={tmp_path / 'lora'}"], check=True, capture_output=True)
    prompt = input_ids(batch=1, seq=5)
    with torch.no_grad():
        expected = model.generate(prompt, do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    genai_model = og.Model(str(tmp_path / "genai"))
    params = og.GeneratorParams(genai_model)
    params.set_search_options(do_sample=False, max_length=17, min_length=17)
    generator = og.Generator(genai_model, params)
    generator.append_tokens(prompt[0].tolist())
    while not generator.is_done():
        generator.generate_next_token()
    assert [int(t) for t in generator.get_sequence(0)] == expected[0].tolist()
