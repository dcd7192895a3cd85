"""MissConfig: validation messages, per-layer rules at apply time, PEFT conversions both ways."""

import peft
import pytest
import torch
from torch import nn

from miss_compile import MissConfig, apply_miss

BAD_FIELDS = [
    ({"r": 0}, r"MissConfig.r must be a positive integer, got 0"),
    ({"r": 2.5}, r"MissConfig.r must be a positive integer"),
    ({"r": True}, r"MissConfig.r must be a positive integer"),
    ({"variant": "lora"}, r"MissConfig.variant must be one of \('balance', 'bat', 'mini'\), got 'lora'"),
    ({"mini_r": -1}, r"MissConfig.mini_r must be a positive integer"),
    ({"dropout": 1.0}, r"MissConfig.dropout must be a float in \[0, 1\), got 1.0"),
    ({"dropout": -0.1}, r"MissConfig.dropout must be a float in \[0, 1\)"),
    ({"init": "kaiming"}, r"MissConfig.init must be one of \('zeros', 'random'\)"),
    ({"target_modules": []}, r"MissConfig.target_modules must be a non-empty list"),
    ({"target_modules": "q_proj("}, r"MissConfig.target_modules is not a valid regex"),
    ({"exclude_modules": [1]}, r"MissConfig.exclude_modules must be a non-empty list"),
]


@pytest.mark.parametrize("fields,message", BAD_FIELDS)
def test_invalid_field_is_named(fields, message):
    with pytest.raises(ValueError, match=message):
        MissConfig(**fields)


class TwoLayers(nn.Module):
    def __init__(self, in_features=12, hidden=10, out_features=6):
        super().__init__()
        self.up = nn.Linear(in_features, hidden)
        self.down = nn.Linear(hidden, out_features)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


LAYER_RULES = [
    (MissConfig(r=16), r"layer 'up' \(in_features=12, out_features=10\): r=16 must be <= in_features"),
    (MissConfig(r=4, variant="bat"),
     r"layer 'up' \(in_features=12, out_features=10\): variant 'bat' needs in_features and out_features divisible by r=4"),
    (MissConfig(r=2, variant="mini", mini_r=4),
     r"layer 'up' \(in_features=12, out_features=10\): variant 'mini' needs out_features divisible by mini_r=4"),
]


@pytest.mark.parametrize("config,message", LAYER_RULES)
def test_layer_rules_name_layer_and_shape(config, message):
    model = TwoLayers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        apply_miss(model, config)
    assert isinstance(model.up, nn.Linear) and isinstance(model.down, nn.Linear)
    assert model.state_dict().keys() == before.keys()
    assert all(p.requires_grad for p in model.parameters())


def test_no_matching_target_is_an_error():
    with pytest.raises(ValueError, match=r"no layer matched target_modules=\['k_proj'\]"):
        apply_miss(TwoLayers(), MissConfig(r=2, target_modules=["k_proj"]))


def test_target_that_is_not_linear_is_an_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"target_modules selects '1', a LayerNorm"):
        apply_miss(model, MissConfig(r=2, target_modules=".*"))
    assert isinstance(model[0], nn.Linear)


@pytest.mark.parametrize(
    "ours,peft_fields",
    [
        (MissConfig(r=8), {"init_weights": True}),
        (MissConfig(r=8, init="random"), {"init_weights": False}),
        (MissConfig(r=4, variant="bat", dropout=0.1), {"init_weights": "bat", "miss_dropout": 0.1}),
        (MissConfig(r=4, variant="mini", mini_r=2), {"init_weights": "mini", "mini_r": 2}),
    ],
)
def test_peft_conversion_both_ways(ours, peft_fields):
    theirs = ours.to_peft()
    assert isinstance(theirs, peft.MissConfig)
    assert theirs.r == ours.r
    for key, value in peft_fields.items():
        assert getattr(theirs, key) == value
    back = MissConfig.from_peft(theirs)
    assert back == ours
    assert MissConfig.from_peft(ours.to_peft_dict()) == ours


def test_from_peft_lists_and_regexes():
    theirs = peft.MissConfig(r=2, target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.0\..*")
    ours = MissConfig.from_peft(theirs)
    assert ours.target_modules == ["q_proj", "v_proj"]
    assert ours.selects("model.layers.1.self_attn.q_proj")
    assert not ours.selects("model.layers.0.self_attn.q_proj")
    assert not ours.selects("model.layers.1.self_attn.k_proj")


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"peft_type": "LORA", "r": 8}, r"peft_type is 'LORA', expected 'MISS'"),
        ({"peft_type": "MISS", "r": 8, "init_weights": "pissa"}, r"init_weights must be True, False, 'bat' or 'mini'"),
        ({"peft_type": "MISS", "r": 8, "target_modules": ".*q", "layers_to_transform": 0},
         r"layers_to_transform / layers_pattern need target_modules as a list of module names, got target_modules='.\*q'"),
        ({"peft_type": "MISS", "r": 8, "target_modules": ["q"], "layers_to_transform": [-1]},
         r"layers_to_transform must be a layer index >= 0"),
        ({"peft_type": "MISS", "r": 8, "target_modules": ["q"], "target_parameters": ["w"]},
         r"target_parameters=\['w'\] is not supported"),
        ({"peft_type": "MISS", "r": 8, "target_modules": ["q"], "modules_to_save": ["score("]},
         r"modules_to_save entry 'score\(' is not a valid regex"),
        ({"peft_type": "MISS", "r": 8, "target_modules": None}, r"target_modules is None"),
        ({"peft_type": "MISS", "r": -3, "target_modules": ["q"]}, r"MissConfig.r must be a positive integer"),
    ],
)
def test_from_peft_rejects(fields, message):
    with pytest.raises(ValueError, match=message):
        MissConfig.from_peft(fields)


def test_from_peft_warns_on_unknown_fields():
    with pytest.warns(UserWarning, match=r"ignoring fields unknown to PEFT's MissConfig: \['rank_pattern'\]"):
        config = MissConfig.from_peft({"peft_type": "MISS", "r": 2, "target_modules": ["q"], "rank_pattern": {}})
    assert config.r == 2


@pytest.mark.parametrize("name,pattern,index", [
    ("model.layers.3.self_attn.q_proj", None, 3),
    ("model.layers.1.mlp.experts.0.up_proj", None, 1),  # the first number, not the expert's
    ("transformer.h.2.attn.c_attn", "h", 2),
    ("encoder.layer.4.attention.self.query", ["h", "layer"], 4),
    ("model.layers.3.self_attn.q_proj", "blocks", None),
    ("model.lm_head", None, None),
])
def test_layer_index_is_found_as_peft_finds_it(name, pattern, index):
    from miss_compile.config import layer_index

    assert layer_index(name, pattern) == index
    peft_config = peft.MissConfig(r=2, target_modules=[name.rpartition(".")[2]], layers_to_transform=[index or 0],
                                  layers_pattern=pattern)
    from peft.tuners.tuners_utils import check_target_module_exists

    selected_by_peft = bool(check_target_module_exists(peft_config, name))
    assert selected_by_peft == (index is not None)
    assert MissConfig.from_peft(peft_config).selects(name) == selected_by_peft


def test_layers_to_transform_zero_is_kept():
    config = MissConfig.from_peft({"peft_type": "MISS", "r": 2, "target_modules": ["q_proj"], "layers_to_transform": 0})
    assert config.layers_to_transform == 0
    assert config.selects("model.layers.0.self_attn.q_proj")
    assert not config.selects("model.layers.1.self_attn.q_proj")
    assert config.to_peft_dict()["layers_to_transform"] == 0
