"""onnxruntime-genai folders (export_genai_folder): greedy tokens through onnxruntime-genai equal
transformers' generate of the MiSS model, merged and unmerged, and adapters swap through og.Adapters.

Llama and Qwen2 carry PEFT's MiSS; GPT-2 ours (PEFT's MiSS does not adapt Conv1D). Prompts avoid the
pad id: genai reads prompt tokens equal to it as padding. transformers' min_new_tokens and genai's
min_length both hold back eos, so both produce exactly NEW tokens.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime_genai as og  # a dependency of this feature: ./dev installs it
import peft
import pytest
import torch
import transformers
from helpers import build, randomize_blocks
from small_models import VOCAB

from miss_compile import MissConfig, apply_miss
from miss_compile.export import write_onnx_adapter
from miss_compile.export.genai import GENAI_ARCHITECTURES, export_genai_folder
from miss_compile.peft_compat import model_root

NEW = 24
EOS = 2  # the tiny configs' eos (Qwen2's names none; GPT-2's 50256 is past the tiny vocab)
ADAPTED = {  # arch -> (MissConfig, PEFT's or ours)
    "llama": (MissConfig(r=3, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]), "peft"),
    "qwen2": (MissConfig(r=4, variant="mini", mini_r=8, target_modules=["q_proj", "v_proj", "up_proj"]), "peft"),
    "gpt2": (MissConfig(r=8, variant="bat", target_modules=["c_attn", "c_fc", "c_proj"]), "ours"),
    "mistral": (MissConfig(r=3, target_modules=["q_proj", "v_proj", "gate_proj"]), "peft"),
}


def base_model(arch: str) -> torch.nn.Module:
    base = build(arch)
    base.config.eos_token_id = base.generation_config.eos_token_id = EOS
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger weights than the init's: varied tokens, not one token repeated
        for weight in (p for p in base.parameters() if p.dim() == 2):
            weight.normal_(0, 0.3, generator=generator)
    return base


def adapted(arch: str, seed: int) -> torch.nn.Module:
    config, kind = ADAPTED[arch]
    base = base_model(arch)
    if kind == "peft":
        model = peft.get_peft_model(base, config.to_peft())
    else:
        model = base
        apply_miss(model, config)
    randomize_blocks(model, seed=seed)
    return model.eval()


def prompts(batch: int, seq: int = 6, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + batch)
    return torch.randint(EOS + 1, VOCAB, (batch, seq), generator=generator)


@torch.no_grad()
def expected_tokens(model: torch.nn.Module, ids: torch.Tensor) -> list[list[int]]:
    tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=EOS, eos_token_id=EOS)
    assert tokens.shape == (len(ids), ids.shape[1] + NEW)
    return tokens.tolist()


def genai_tokens(folder, ids: torch.Tensor, adapter: str | None = None) -> list[list[int]]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    total = ids.shape[1] + NEW
    params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=len(ids))
    generator = og.Generator(model, params)
    if adapter is not None:
        adapters = og.Adapters(model)
        adapters.load(str(folder / "adapters" / f"{adapter}.onnx_adapter"), adapter)
        generator.set_active_adapter(adapters, adapter)
    generator.append_tokens(ids.numpy().astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [[int(t) for t in generator.get_sequence(row)] for row in range(len(ids))]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """arch -> (first model, second model, merged folder, unmerged folder with the second adapter too)."""
    made = {}

    def get(arch: str):
        if arch not in made:
            folder = tmp_path_factory.mktemp(f"genai_{arch}")
            first, second = adapted(arch, seed=2), adapted(arch, seed=11)
            # the second adapter reaches the folder as each kind of source: a model, a PEFT folder, a file
            if arch == "llama":
                source = second
            elif arch == "qwen2":
                second.save_pretrained(folder / "second_peft")
                source = folder / "second_peft"
            else:
                source = write_onnx_adapter(second, folder / "second.onnx_adapter")
            merged = export_genai_folder(first, folder / "merged", merged=True)
            unmerged = export_genai_folder(first, folder / "unmerged", merged=False, adapters={"second": source})
            made[arch] = first, second, merged, unmerged
        return made[arch]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_tokens_equal_transformers(exported, arch, batch):
    first, second, merged, unmerged = exported(arch)
    ids = prompts(batch)
    expected = expected_tokens(first, ids)
    assert genai_tokens(merged.path, ids) == expected
    assert genai_tokens(unmerged.path, ids) == expected  # the graph's own blocks, no adapter activated
    assert genai_tokens(unmerged.path, ids, adapter="default") == expected
    second_expected = expected_tokens(second, ids)
    assert second_expected != expected  # the adapters matter
    assert genai_tokens(unmerged.path, ids, adapter="second") == second_expected


@pytest.mark.slow
def test_folder_layout_and_config(exported):
    first, _, merged, unmerged = exported("qwen2")
    assert sorted(p.name for p in merged.path.iterdir()) == ["genai_config.json", "model.onnx"]
    assert sorted(p.name for p in (unmerged.path / "adapters").iterdir()) == ["default.onnx_adapter",
                                                                               "second.onnx_adapter"]
    config = json.loads((unmerged.path / "genai_config.json").read_text())
    assert config == unmerged.config
    decoder = config["model"]["decoder"]
    lm = model_root(first)
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"], decoder["num_key_value_heads"],
            decoder["head_size"], decoder["hidden_size"]) == (2, 4, 2, 8, 32)  # grouped KV heads
    assert decoder["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                                 "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                                 "past_value_names": "past_key_values.%d.value"}
    assert decoder["outputs"] == {"logits": "logits", "present_key_names": "present.%d.key",
                                  "present_value_names": "present.%d.value"}
    assert config["model"]["type"] == "decoder" and config["model"]["vocab_size"] == VOCAB
    assert config["model"]["context_length"] == lm.config.max_position_embeddings
    assert (config["model"]["eos_token_id"], config["model"]["pad_token_id"]) == (EOS, EOS)
    assert config["search"]["past_present_share_buffer"] is False
    assert config["search"]["max_length"] == lm.config.max_position_embeddings


def char_tokenizer(folder) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE over 64 characters (genai's tokenizer reads BPE; it does not read WordLevel)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(c) for r in ("az", "AZ", "09") for c in range(ord(r[0]), ord(r[1]) + 1)] + ["\u0120", "!"]
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=chars[EOS])
    fast.save_pretrained(folder)
    return fast


@pytest.mark.slow
def test_mistral_folder_with_the_base_tokenizer(tmp_path):
    model = adapted("mistral", seed=2)
    tokenizer = char_tokenizer(tmp_path / "base")
    folder = export_genai_folder(model, tmp_path / "out", tokenizer_from=tmp_path / "base")
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(folder.tokenizer_files)
    assert all((folder.path / name).is_file() for name in folder.tokenizer_files)
    text = "hello World 42"  # no 'c': the eos and pad id
    ids = torch.tensor([tokenizer.encode(text), tokenizer.encode("abdefghij KLMN")])
    assert list(og.Tokenizer(og.Model(str(folder.path))).encode(text)) == ids[0].tolist()
    assert genai_tokens(folder.path, ids) == expected_tokens(model, ids)


def test_genai_architectures_are_the_tested_ones():
    assert sorted(GENAI_ARCHITECTURES) == ["gpt2", "llama", "mistral", "qwen2"]


# -- bad input: a clear error, and nothing written ---------------------------------------------------


def tiny_mamba() -> torch.nn.Module:
    config = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=4, num_hidden_layers=2,
                                      eos_token_id=EOS)
    return transformers.MambaForCausalLM(config).eval()


def llama_with_two_active() -> torch.nn.Module:
    model = adapted("llama", seed=2)
    model.add_adapter("other", ADAPTED["llama"][0].to_peft())
    model.base_model.set_adapter(["default", "other"])
    return model


REFUSED = {
    "encoder": (lambda: build("bert"), {}, r"BertModel \(bert\) is not a causal LM and keeps no KV cache"),
    "unsupported architecture": (tiny_mamba, {}, r"MambaForCausalLM \(model_type 'mamba'\) is not an architecture .*"
                                                 r"supported: gpt2, llama, mistral, qwen2"),
    "no eos": (lambda: build("qwen2"), {}, r"Qwen2ForCausalLM names no eos_token_id"),
    "adapters on a merged graph": (lambda: adapted("llama", 2), {"adapters": {"b": "x"}},
                                   r"adapters \['b'\] given with merged=True"),
    "two active adapters": (llama_with_two_active, {"merged": False},
                            r"active adapters \['default', 'other'\]; an unmerged genai folder serves one"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_before_anything_is_written(tmp_path, case):
    make, kwargs, message = REFUSED[case]
    with pytest.raises(ValueError, match=message):
        export_genai_folder(make(), tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["onnx_adapter", "peft folder"])
def test_adapter_for_another_graph_is_refused(tmp_path, kind):
    """A GPT-2 adapter (other layer names) and a rank-5 Llama adapter (other shapes) for a rank-3 Llama graph."""
    if kind == "onnx_adapter":
        source = write_onnx_adapter(adapted("gpt2", seed=2), tmp_path / "gpt2.onnx_adapter")
        message = r"adapter 'other' .* does not fit the llama graph .*\n  'transformer\.h\.0\.attn\.c_attn\.miss_block\.default' is not an overridable block"
    else:
        other = peft.get_peft_model(build("llama"), MissConfig(r=5, target_modules=["q_proj"]).to_peft())
        other.save_pretrained(tmp_path / "rank5")
        source = tmp_path / "rank5"
        message = r"'model\.layers\.0\.self_attn\.q_proj\.miss_block\.default': shape \(5, 32\), the graph expects \(3, 32\)"
    before = sorted(tmp_path.iterdir())
    with pytest.raises(ValueError, match=message):
        export_genai_folder(adapted("llama", 2), tmp_path / "out", merged=False, adapters={"other": source})
    assert sorted(tmp_path.iterdir()) == before


def test_a_folder_in_use_is_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export_genai_folder(adapted("llama", 2), tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_a_folder_genai_does_not_run_as_torch_is_not_written(tmp_path, monkeypatch):
    """The final check opens the staged folder in genai and compares its logits with torch's: a graph of
    other blocks (standing in for any config that misdescribes the graph) fails it, and nothing is written."""
    import miss_compile.export.genai as genai

    export = genai.export_causal_lm
    monkeypatch.setattr(genai, "export_causal_lm",
                        lambda model, path, **kwargs: export(adapted("llama", seed=11), path, **kwargs))
    with pytest.raises(RuntimeError, match=r"onnxruntime-genai's logits with adapter None differ from torch's by"):
        export_genai_folder(adapted("llama", seed=2), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_writes_the_folder(tmp_path, capsys):
    """miss-export BASE --adapter DIR -o OUT_DIR --task text-generation-with-past --unmerged: the PEFT model's
    tokens through the folder's adapter file, and the base's tokenizer beside the graph."""
    from miss_compile.export.cli import main

    model = adapted("llama", seed=2)
    base_model("llama").save_pretrained(tmp_path / "base")
    char_tokenizer(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "genai"
    assert main([str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "-o", str(out),
                 "--task", "text-generation-with-past", "--unmerged"]) == 0
    assert "onnxruntime-genai folder (unmerged, adapters ['default'])" in capsys.readouterr().out
    assert {"tokenizer.json", "tokenizer_config.json", "genai_config.json", "model.onnx", "adapters"} <= {
        p.name for p in out.iterdir()}
    ids = prompts(2)
    assert genai_tokens(out, ids, adapter="default") == expected_tokens(model, ids)


def test_cli_refuses_an_encoder(tmp_path, capsys):
    from miss_compile.export.cli import main

    build("bert").save_pretrained(tmp_path / "bert")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "bert"), "-o", str(tmp_path / "out"), "--task", "text-generation-with-past"])
    assert exit_info.value.code == 2
    assert "BertModel (bert) is not a causal LM and keeps no KV cache" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
