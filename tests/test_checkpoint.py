"""PEFT-format checkpoints: ours load in PEFT, PEFT's load in ours, and every bad file is named."""

import json

import peft
import pytest
import torch
from helpers import build, clone, input_ids, model_output, randomize_blocks
from safetensors.torch import load_file, save_file

from miss_compile import MissConfig, apply_miss, load_adapter, save_adapter
from miss_compile.peft_compat import named_miss_layers

CONFIGS = {
    "balance": MissConfig(r=3, target_modules=["q_proj", "v_proj", "down_proj"]),  # 48 % 3 == 0, 32 % 3 != 0
    "mini": MissConfig(r=4, variant="mini", mini_r=8, target_modules=["q_proj", "up_proj"]),
    "bat": MissConfig(r=8, variant="bat", target_modules="all-linear"),
}


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before, trainable_before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert [p.requires_grad for p in model.parameters()] == trainable_before


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_our_checkpoint_loads_in_peft(tmp_path, variant):
    base = build("llama")
    ours = apply_miss(clone(base), CONFIGS[variant])
    randomize_blocks(ours)
    save_adapter(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MISS"
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.miss_block" in keys
    assert not list(tmp_path.glob(".*"))  # no temp files left behind
    theirs = peft.PeftModel.from_pretrained(clone(base), tmp_path).eval()
    ids = input_ids()
    torch.testing.assert_close(model_output(ours, ids), model_output(theirs, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_peft_checkpoint_loads_in_ours(tmp_path, variant):
    base = build("llama")
    theirs = peft.get_peft_model(clone(base), CONFIGS[variant].to_peft())
    randomize_blocks(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(clone(base), tmp_path)
    assert len(named_miss_layers(ours)) == len(named_miss_layers(theirs))
    ids = input_ids()
    expected = model_output(theirs.eval(), ids)
    torch.testing.assert_close(model_output(ours, ids), expected, atol=1e-5, rtol=1e-5)
    # Into a live PEFT model, as a second adapter: no conversion step.
    live = peft.get_peft_model(clone(base), CONFIGS[variant].to_peft())
    load_adapter(live, tmp_path, adapter_name="trained")
    live.set_adapter("trained")
    torch.testing.assert_close(model_output(live.eval(), ids), expected, atol=1e-5, rtol=1e-5)


def test_round_trip_keeps_blocks_exactly(tmp_path):
    ours = apply_miss(build("qwen2"), CONFIGS["balance"])
    randomize_blocks(ours)
    save_adapter(ours, tmp_path)
    again = load_adapter(build("qwen2"), tmp_path)
    for name, layer in named_miss_layers(ours).items():
        assert torch.equal(layer.miss_block["default"], named_miss_layers(again)[name].miss_block["default"])


def test_legacy_bin_loads_with_weights_only(tmp_path):
    ours = apply_miss(build("llama"), CONFIGS["balance"])
    randomize_blocks(ours)
    save_adapter(ours, tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(weights, tmp_path / "adapter_model.bin")
    loaded = load_adapter(build("llama"), tmp_path)
    ids = input_ids()
    torch.testing.assert_close(model_output(loaded, ids), model_output(ours, ids))


@pytest.fixture
def saved(tmp_path):
    ours = apply_miss(build("llama"), CONFIGS["balance"])
    randomize_blocks(ours)
    save_adapter(ours, tmp_path)
    return tmp_path


def _edit_weights(directory, edit):
    path = directory / "adapter_model.safetensors"
    weights = dict(load_file(path))
    edit(weights)
    save_file(weights, path)


def _edit_config(directory, **fields):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


Q0 = "base_model.model.model.layers.0.self_attn.q_proj.miss_block"


BAD_CHECKPOINTS = {
    "wrong peft_type": (lambda d: _edit_config(d, peft_type="LORA"), r"peft_type is 'LORA', expected 'MISS'"),
    "missing key": (
        lambda d: _edit_weights(d, lambda w: w.pop(Q0)),
        r"missing blocks for adapted layers: \['base_model.model.model.layers.0.self_attn.q_proj.miss_block'\]",
    ),
    "extra key": (
        lambda d: _edit_weights(d, lambda w: w.update({"base_model.model.lm_head.miss_block": torch.zeros(3, 64)})),
        r"blocks for layers without adapter 'default': \['base_model.model.lm_head.miss_block'\]",
    ),
    "foreign key": (
        lambda d: _edit_weights(d, lambda w: w.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(1)})),
        r"keys that are not MiSS blocks .*lora_A",
    ),
    "shape mismatch": (
        lambda d: _edit_weights(d, lambda w: w.update({Q0: torch.zeros(3, 16)})),
        r"q_proj.miss_block: shape \(3, 16\) in the file, \(3, 32\) in the model \(in_features=32, out_features=32\)",
    ),
    "truncated file": (
        lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:100]),
        r"adapter_model.safetensors is truncated or corrupted",
    ),
    "bad json": (lambda d: (d / "adapter_config.json").write_text("{r: 3"), r"adapter_config.json is not valid JSON"),
    "no weights": (lambda d: (d / "adapter_model.safetensors").unlink(), r"adapter_model.safetensors not found"),
    "bad field": (lambda d: _edit_config(d, r=0), r"adapter_config.json: MissConfig.r must be a positive integer"),
    "config disagrees with blocks": (
        lambda d: _edit_config(d, r=4, init_weights="bat"),
        r"q_proj.miss_block: shape \(3, 32\) in the file, \(8, 4, 4\) in the model",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_named_and_model_untouched(saved, case):
    damage, message = BAD_CHECKPOINTS[case]
    damage(saved)
    model = build("llama")
    before, trainable = state(model), [p.requires_grad for p in model.parameters()]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_adapter(model, saved)
    assert not named_miss_layers(model)
    assert_unchanged(model, before, trainable)


def test_non_finite_block_refused_when_checked(saved):
    _edit_weights(saved, lambda w: w[Q0].__setitem__((0, 0), float("nan")))
    model = build("llama")
    with pytest.raises(ValueError, match=r"q_proj.miss_block: holds NaN or Inf"):
        load_adapter(model, saved, check_finite=True)
    assert not named_miss_layers(model)
    load_adapter(model, saved)  # unchecked by default, like PEFT; merging still refuses (test_models)


def test_failed_load_into_existing_adapter_keeps_old_blocks(saved):
    model = apply_miss(build("llama"), CONFIGS["balance"])
    randomize_blocks(model, seed=7)
    _edit_weights(saved, lambda w: w.update({Q0: torch.zeros(3, 16)}))
    before, trainable = state(model), [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="shape"):
        load_adapter(model, saved)
    assert_unchanged(model, before, trainable)


def test_save_without_adapter_is_an_error(tmp_path):
    model = apply_miss(build("llama"), CONFIGS["balance"])
    with pytest.raises(ValueError, match=r"no layer carries an adapter named 'other'"):
        save_adapter(model, tmp_path, adapter_name="other")
    assert not list(tmp_path.iterdir())


# --- never silently wrong (issue 13)


def test_finite_check_is_made_in_the_blocks_dtype(saved):
    # 1e5 is finite in the file's fp32 and Inf in the model's fp16 blocks.
    _edit_weights(saved, lambda w: w[Q0].__setitem__((0, 0), 1e5))
    model = apply_miss(build("llama"), CONFIGS["balance"]).half()
    before, trainable = state(model), [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=r"q_proj.miss_block: 1 of 96 values \(largest 1e\+05\) overflow the model's "
                                         r"torch.float16 \(max 6.55e\+04\)"):
        load_adapter(model, saved, check_finite=True)
    assert_unchanged(model, before, trainable)
    fp32 = load_adapter(apply_miss(build("llama"), CONFIGS["balance"]), saved, check_finite=True)
    assert named_miss_layers(fp32)["model.layers.0.self_attn.q_proj"].miss_block["default"][0, 0] == 1e5


def _give_other_settings(model, layer_name, config):
    layer = named_miss_layers(model)[layer_name]
    layer.remove_adapter("default")
    layer.add_adapter("default", config)


@pytest.mark.parametrize("other", [
    MissConfig(r=4, target_modules=["v_proj"]),
    MissConfig(r=3, dropout=0.1, target_modules=["v_proj"]),
    MissConfig(r=4, variant="mini", mini_r=8, target_modules=["v_proj"]),
])
def test_adapter_whose_layers_disagree_is_not_saved(tmp_path, other):
    model = apply_miss(build("llama"), CONFIGS["balance"])
    _give_other_settings(model, "model.layers.1.self_attn.v_proj", other)
    message = (r"adapter 'default' has different settings on different layers: r=3, mini_r=1, dropout=0.0, "
               r"variant='balance' on \['model.layers.0.self_attn.q_proj', .*, \.\.\. 1 more\]; "
               r".* on \['model.layers.1.self_attn.v_proj'\]\. .* save each name separately")
    with pytest.raises(ValueError, match=message):
        save_adapter(model, tmp_path)
    assert not list(tmp_path.iterdir())


def test_apply_refuses_a_second_config_under_one_adapter_name():
    model = apply_miss(build("llama"), MissConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"adapter 'default' already exists with r=4, .* adding it with r=8"):
        apply_miss(model, MissConfig(r=8, target_modules=["v_proj"]))


def test_check_same_settings_names_both_configs():
    from miss_compile.adapter_settings import check_same_settings

    model = apply_miss(build("llama"), MissConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"adapter 'default' already exists with r=4, mini_r=1, dropout=0.0, "
                                         r"variant='balance' on \['model.layers.0.self_attn.q_proj', "
                                         r"'model.layers.1.self_attn.q_proj'\]; adding it with r=8"):
        check_same_settings(model, MissConfig(r=8, target_modules=["v_proj"]), "default")
    check_same_settings(model, MissConfig(r=4, target_modules=["v_proj"]), "default")  # same settings: fine
    check_same_settings(model, MissConfig(r=8, target_modules=["v_proj"]), "other")  # another name: fine


LAYER_SELECTIONS = [(0, None), ([1], None), ([1], "layers"), (0, ["h", "layers"])]


@pytest.mark.parametrize("layers,pattern", LAYER_SELECTIONS)
def test_layers_to_transform_selects_peft_layers(tmp_path, layers, pattern):
    base = build("llama")
    fields = dict(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=layers, layers_pattern=pattern)
    theirs = peft.get_peft_model(clone(base), peft.MissConfig(**fields))
    randomize_blocks(theirs)
    theirs.save_pretrained(tmp_path)
    wanted = [layers] if isinstance(layers, int) else layers
    expected_layers = sorted(named_miss_layers(theirs))
    assert {int(name.split(".")[2]) for name in expected_layers} == set(wanted)
    ours = load_adapter(clone(base), tmp_path)
    assert sorted(named_miss_layers(ours)) == expected_layers
    ids = input_ids()
    torch.testing.assert_close(model_output(ours, ids), model_output(theirs.eval(), ids), atol=1e-5, rtol=1e-5)
    fresh = apply_miss(clone(base), MissConfig(**fields))
    assert sorted(named_miss_layers(fresh)) == expected_layers
    assert json.loads((tmp_path / "adapter_config.json").read_text())["layers_to_transform"] == layers


def test_layers_to_transform_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"no layer matched target_modules=\['q_proj'\]"):
        apply_miss(build("llama"), MissConfig(r=4, target_modules=["q_proj"], layers_to_transform=[5]))
