"""What a checkpoint says about where it can go: one WARNING when PEFT cannot load it (GPT-2's Conv1D
layers), the base model class recorded as PEFT records it (auto_mapping), and one WARNING when an adapter
loads into another class (a Qwen2 adapter on a Llama of the same shapes); the usual cases stay quiet."""

import json
import logging
import warnings

import peft
import pytest
import torch
from small_models import tiny_gpt2, tiny_llama, tiny_qwen2

from miss_compile import MissConfig, apply_miss, load_adapter, save_adapter
from miss_compile.peft_compat import named_miss_layers

CONFIG = MissConfig(r=4, init="random", target_modules="all-linear")


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("miss_compile")]


def _blocks(model) -> dict[str, torch.Tensor]:
    return {name: layer.miss_block["default"] for name, layer in named_miss_layers(model).items()}


def _adapted(build, seed: int = 0):
    torch.manual_seed(seed)
    return apply_miss(build(), CONFIG)


def test_a_gpt2_checkpoint_warns_once_that_peft_cannot_load_it(tmp_path, caplog):
    model = _adapted(tiny_gpt2)
    with caplog.at_level(logging.WARNING, logger="miss_compile"):
        save_adapter(model, tmp_path)
    messages = _warnings(caplog)
    assert len(messages) == 1, messages
    conv1d = [name for name, layer in named_miss_layers(model).items() if type(layer.base_layer).__name__ == "Conv1D"]
    assert len(conv1d) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in 2 blocks
    assert (f"PeftModel.from_pretrained cannot load {tmp_path}: 8 of its 8 layers are Conv1D, and PEFT's MiSS adapts "
            "nn.Linear only (transformer.h.0.attn.c_attn, transformer.h.0.attn.c_proj, ") in messages[0]
    assert "and 4 more" in messages[0] and "miss_compile.to_lora" in messages[0]
    with pytest.raises(TypeError, match="only `torch.nn.Linear`"):  # the warning is true
        peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    caplog.clear()
    other = apply_miss(tiny_gpt2(), CONFIG)
    with caplog.at_level(logging.WARNING, logger="miss_compile"):
        load_adapter(other, tmp_path)  # ours loads it, quietly: same class
    assert _warnings(caplog) == []
    for name, block in _blocks(model).items():
        torch.testing.assert_close(_blocks(other)[name], block, rtol=0, atol=0)


def test_a_linear_checkpoint_records_its_class_as_peft_does_and_peft_loads_it_quietly(tmp_path, caplog):
    model = _adapted(tiny_llama)
    with caplog.at_level(logging.WARNING, logger="miss_compile"):
        save_adapter(model, tmp_path)
    assert _warnings(caplog) == []
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    assert fields["auto_mapping"] == {"base_model_class": "LlamaForCausalLM",
                                      "parent_library": "transformers.models.llama.modeling_llama"}
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert [str(w.message) for w in caught if "auto_mapping" in str(w.message)] == []
    assert theirs.peft_config["default"].auto_mapping == fields["auto_mapping"]
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_a_peft_model_records_the_transformers_class_underneath(tmp_path):
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_qwen2(), peft.MissConfig(r=4, target_modules=["q_proj", "v_proj"]))
    save_adapter(model, tmp_path)
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    assert fields["auto_mapping"]["base_model_class"] == "Qwen2ForCausalLM"


def test_an_adapter_loaded_into_another_class_warns_naming_both(tmp_path, caplog):
    save_adapter(_adapted(tiny_qwen2), tmp_path)
    llama = tiny_llama()
    with caplog.at_level(logging.WARNING, logger="miss_compile"):
        load_adapter(llama, tmp_path)
    messages = _warnings(caplog)
    assert len(messages) == 1, messages
    assert f"the adapter in {tmp_path} was trained on a Qwen2ForCausalLM" in messages[0]
    assert "loaded into a LlamaForCausalLM" in messages[0]
    saved = _blocks(_adapted(tiny_qwen2))  # the same seed: the blocks that were saved
    assert _blocks(llama).keys() == saved.keys()
    for name, block in saved.items():  # it still loads: shapes fit
        torch.testing.assert_close(_blocks(llama)[name], block, rtol=0, atol=0)


def test_a_checkpoint_without_a_recorded_class_loads_quietly(tmp_path, caplog):
    save_adapter(_adapted(tiny_qwen2), tmp_path)
    path = tmp_path / "adapter_config.json"
    fields = json.loads(path.read_text())
    del fields["auto_mapping"]  # PEFT writes none when task_type is set; older checkpoints of ours neither
    path.write_text(json.dumps(fields))
    with caplog.at_level(logging.WARNING, logger="miss_compile"):
        load_adapter(tiny_llama(), tmp_path)
    assert _warnings(caplog) == []
