"""Bad inputs the other tests do not cover: damaged or hostile files, mistyped config fields, paths
that cannot be written. Each is refused with a message naming what and how to fix it, and leaves
the model and the files exactly as they were.

Covered elsewhere: wrong peft_type, missing/extra/foreign keys, shape mismatch, truncated file,
NaN on load (test_checkpoint); r / mini_r not dividing (test_config, test_models); NaN before
merging and ill-conditioned bat unmerge (test_models, test_reference).
"""

import json
import os
import pickle
import struct

import pytest
import torch
from small_models import TwoLinears
from torch import nn

from miss_compile import MissConfig, apply_miss, load_adapter, merge_adapters, save_adapter
from miss_compile.export import export_onnx
from miss_compile.peft_compat import named_miss_layers

CONFIG = MissConfig(r=4, target_modules=["up", "down"])


def adapted() -> nn.Module:
    torch.manual_seed(0)
    model = apply_miss(TwoLinears().eval(), CONFIG)
    with torch.no_grad():
        for layer in named_miss_layers(model).values():
            layer.miss_block["default"].normal_(std=0.1)
    return model


def snapshot(model: nn.Module) -> dict:
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "trainable": [p.requires_grad for p in model.parameters()],
            "modules": [type(m).__name__ for m in model.modules()]}


def assert_same_model(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"] and after["trainable"] == before["trainable"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():  # bit for bit, NaN where NaN was
        torch.testing.assert_close(after["state"][key], value, rtol=0, atol=0, equal_nan=True, msg=key)


def folder_bytes(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "adapter"
    save_adapter(adapted(), folder)
    return folder


def load_refused(folder, message, error=ValueError):
    """load_adapter refuses `folder` with `message`; the model and the folder stay as they were."""
    model = TwoLinears().eval()
    before, files = snapshot(model), folder_bytes(folder)
    with pytest.raises(error, match=message):
        load_adapter(model, folder)
    assert_same_model(model, before)
    assert folder_bytes(folder) == files


# --- damaged safetensors


def _rewrite(path, edit):
    path.write_bytes(edit(path.read_bytes()))


def _header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


DAMAGE = {
    "empty file": lambda data: b"",
    "header length past the end": lambda data: struct.pack("<Q", 10**9) + data[8:],
    "garbled header": lambda data: data[:8] + b"#" * _header_length(data) + data[8 + _header_length(data):],
    "last bytes cut": lambda data: data[:-4],
    "offsets past the end": lambda data: data[:8] + data[8:8 + _header_length(data)].replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1) + data[8 + _header_length(data):],
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_safetensors_is_named(saved, damage):
    _rewrite(saved / "adapter_model.safetensors", DAMAGE[damage])
    load_refused(saved, r"adapter_model.safetensors is truncated or corrupted \(.*\); re-save or re-download")


# --- legacy adapter_model.bin: tensors only


class _Payload:
    """Unpickling this would create a file: the stand-in for arbitrary code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _legacy(saved, content, raw=False):
    (saved / "adapter_model.safetensors").unlink()
    path = saved / "adapter_model.bin"
    if raw:
        path.write_bytes(content)
    else:
        torch.save(content, path)


def test_legacy_bin_with_code_is_never_unpickled(saved, tmp_path):
    marker = tmp_path / "code-ran"
    _legacy(saved, {"base_model.model.up.miss_block": torch.zeros(4, 16), "payload": _Payload(str(marker))})
    load_refused(saved, r"adapter_model.bin holds pickled objects other than tensors .*refusing to unpickle them")
    assert not marker.exists()


def test_legacy_bin_plain_pickle_with_code_is_refused(saved, tmp_path):
    marker = tmp_path / "code-ran"
    _legacy(saved, pickle.dumps(_Payload(str(marker))), raw=True)
    load_refused(saved, r"adapter_model.bin holds pickled objects other than tensors \(Unsupported operand")
    assert not marker.exists()


def test_legacy_bin_that_is_not_a_dict_of_tensors(saved):
    _legacy(saved, [torch.zeros(4, 16)])
    load_refused(saved, r"adapter_model.bin must hold a dict of name -> tensor, got list")


def test_truncated_legacy_bin(saved):
    _legacy(saved, {"base_model.model.up.miss_block": torch.zeros(4, 16)})
    _rewrite(saved / "adapter_model.bin", lambda data: data[: len(data) // 2])
    load_refused(saved, r"adapter_model.bin is truncated or corrupted")


# --- adapter_config.json, field by field


BAD_FIELDS = {
    "r as a string": ({"r": "4"}, r"r must be a positive integer, got '4' \(str\)"),
    "r as true": ({"r": True}, r"r must be a positive integer, got True \(bool\)"),
    "r as a float": ({"r": 4.0}, r"r must be a positive integer, got 4.0 \(float\)"),
    "mini_r as a string": ({"mini_r": "2"}, r"mini_r must be a positive integer, got '2'"),
    "dropout as a string": ({"miss_dropout": "0.1"}, r"miss_dropout must be a number in \[0, 1\), got '0.1'"),
    "dropout out of range": ({"miss_dropout": 1.5}, r"MissConfig.dropout must be a float in \[0, 1\), got 1.5"),
    "dropout NaN": ({"miss_dropout": float("nan")}, r"MissConfig.dropout must be a float in \[0, 1\), got nan"),
    "init_weights as a string": ({"init_weights": "true"}, r"init_weights must be True, False, 'bat' or 'mini', got 'true'"),
    "target_modules as a number": ({"target_modules": 5}, r"target_modules must be a list of module names.*got 5 \(int\)"),
    "inference_mode as a string": ({"inference_mode": "yes"}, r"inference_mode must be true or false, got 'yes'"),
    "target_parameters set": ({"target_parameters": ["up.weight"]}, r"target_parameters=\['up.weight'\] is not supported"),
    "layers_to_transform with a regex": ({"target_modules": "up|down", "layers_to_transform": 0},
                                         r"layers_to_transform / layers_pattern need target_modules as a list"),
    "layers_to_transform as a string": ({"layers_to_transform": "0"}, r"layers_to_transform must be a list of layer "
                                        r"indices, an index or null, got '0'"),
    "r negative": ({"r": -4}, r"MissConfig.r must be a positive integer, got -4"),
}


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_config_field_is_checked_by_type_and_range(saved, case):
    fields, message = BAD_FIELDS[case]
    path = saved / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    load_refused(saved, r"adapter_config.json: .*" + message)


def test_modules_to_save_matching_nothing_is_refused(saved):
    path = saved / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "modules_to_save": ["head"]}))
    load_refused(saved, r"modules_to_save=\['head'\] matches no module of TwoLinears; the modules would not be trained")


def test_several_wrong_types_are_named_together(saved):
    path = saved / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": "4", "bias": None}))
    load_refused(saved, r"r must be a positive integer, got '4' \(str\); bias must be 'none', got None")


def test_unknown_config_field_is_warned_and_loads(saved):
    path = saved / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "rank_pattern": {}}))
    model = TwoLinears().eval()
    with pytest.warns(UserWarning, match=r"ignoring fields unknown to PEFT's MissConfig: \['rank_pattern'\]"):
        load_adapter(model, saved)
    assert torch.equal(model.up.miss_block["default"], adapted().up.miss_block["default"])


# --- merging: a failure part-way


def test_merge_failing_part_way_restores_merged_layers_bit_for_bit():
    """`up` merges, `down` overflows to Inf: `up` gets its exact weight back (unmerging would round it)."""
    model = adapted()
    with torch.no_grad():
        model.down.base_layer.weight.fill_(3e38)
        model.down.miss_block["default"].fill_(3e38)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layer 'down': merging \['default'\] gives NaN or Inf in the weight \(8, 16\)"
                                         r".*no layer was merged"):
        merge_adapters(model)
    assert_same_model(model, before)
    assert not model.up.merged_adapters and not model.down.merged_adapters


# --- saving: unwritable targets, failures mid-way


def test_save_into_a_file_path_is_named(tmp_path):
    target = tmp_path / "adapter"
    target.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=r"cannot save the adapter to .*adapter: it is a file; pass a folder"):
        save_adapter(adapted(), target)
    assert target.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_save_into_read_only_folder_is_named(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    target.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=r"cannot save the adapter to .*not writable; choose another"):
            save_adapter(adapted(), target)
    finally:
        target.chmod(0o700)


def test_failed_save_leaves_the_earlier_adapter_whole(saved, monkeypatch):
    """The config cannot be written (say, disk full): the earlier weights and config both stay."""
    files = folder_bytes(saved)
    model = adapted()
    with torch.no_grad():
        model.up.miss_block["default"].add_(1.0)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("miss_compile.checkpoint.json.dumps", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        save_adapter(model, saved)
    assert folder_bytes(saved) == files  # no new weights beside the old config, no temp files


# --- export: unwritable paths, and failures leave the model and files as they were


def _export(model, path, **kwargs):
    return export_onnx(model, args=(torch.randn(2, 3, 12),), path=path, **kwargs)


def test_export_into_a_file_path_fails_fast(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"cannot export to .*file/model.onnx: .*file is a file, not a folder"):
        _export(adapted(), tmp_path / "file" / "model.onnx")
    assert folder_bytes(tmp_path) == {(tmp_path / "file").relative_to(tmp_path): b"x"}


def test_export_to_a_folder_is_named(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"cannot export to .*: it is a folder; pass a file path such as"):
        _export(adapted(), tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_export_into_read_only_folder_is_named(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=r"cannot export to .*is not writable; choose a writable folder"):
            _export(adapted(), tmp_path / "model.onnx")
    finally:
        tmp_path.chmod(0o700)


def test_merged_export_with_nan_block_is_refused_and_keeps_files(tmp_path):
    model = adapted()
    with torch.no_grad():
        model.down.miss_block["default"][1, 2] = float("nan")
    (tmp_path / "model.onnx").write_bytes(b"earlier export")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layer 'down': adapter 'default' block \(4, 8\) holds NaN or Inf; refusing to merge"):
        _export(model, tmp_path / "model.onnx", merged=True)
    assert_same_model(model, before)
    assert folder_bytes(tmp_path) == {(tmp_path / "model.onnx").relative_to(tmp_path): b"earlier export"}


@pytest.mark.slow
def test_export_failing_validation_keeps_the_earlier_file(tmp_path, monkeypatch):
    """An export that onnxruntime disagrees with never replaces the file already at the path."""
    model = adapted()
    (tmp_path / "model.onnx").write_bytes(b"earlier export")
    before = snapshot(model)

    def disagree(model, path, *args):
        raise ValueError(f"{path}: output 'out' (2, 3, 8) differs from torch by 1 (relative 1); not saved")

    monkeypatch.setattr("miss_compile.export.validate.validate_export", disagree)
    with pytest.raises(ValueError, match=r"differs from torch by 1"):
        _export(model, tmp_path / "model.onnx")
    assert_same_model(model, before)
    assert folder_bytes(tmp_path) == {(tmp_path / "model.onnx").relative_to(tmp_path): b"earlier export"}
