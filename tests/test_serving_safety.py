"""onnxruntime sessions never serve stale, partial or misnamed adapters, and take int32 adapter ids:
an adapter file rewritten in place or replaced is reloaded, a file is checked against the graph when
it is loaded, ids are widened to the graph's int64 (other dtypes refused by name)."""

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import call, rows_alone
from small_models import TwoLinears

import miss_compile.export.runtime as runtime
from miss_compile import MissConfig, adapter_ids_for, apply_miss, stack_adapters
from miss_compile.export import export_onnx, load_session, write_onnx_adapter, write_onnx_stack
from miss_compile.peft_compat import named_miss_layers

pytestmark = pytest.mark.slow  # each module exports once


class Served(TwoLinears):
    """TwoLinears whose forward takes keywords, so a stacked export can add adapter_ids beside x."""

    def forward(self, x, **kwargs):
        return super().forward(x)


def adapted(seed, names=("default",), targets=("up", "down")):
    torch.manual_seed(0)  # same base weights for every model
    model = Served().eval()
    for name in names:
        apply_miss(model, MissConfig(r=4, target_modules=list(targets)), name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in named_miss_layers(model).values():
            for block in layer.miss_block.values():
                block.copy_(torch.randn(block.shape, generator=generator) * 0.3)
    return model


def run(session, model, x, **options):
    (got,) = session.run({"x": x}, **options)
    with torch.no_grad():
        expected = model(x)
    return got, expected


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    folder = tmp_path_factory.mktemp("safety")
    result = export_onnx(adapted(seed=1), args=(torch.randn(2, 3, 12),), path=folder / "model.onnx")
    return result.path


X = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(7))


# --- 1. a file rewritten under the same path is served with its new contents


def test_adapter_file_replaced_by_write_onnx_adapter_is_reloaded(graph, tmp_path):
    session, path = load_session(graph, device="cpu"), tmp_path / "live.onnx_adapter"
    first, second = adapted(seed=2), adapted(seed=3)
    write_onnx_adapter(first, path, graph)
    torch.testing.assert_close(*run(session, first, X, adapter=path), atol=1e-4, rtol=1e-4)
    inode = path.stat().st_ino
    write_onnx_adapter(second, path, graph)  # staged beside and renamed over: a new inode
    assert path.stat().st_ino != inode
    torch.testing.assert_close(*run(session, second, X, adapter=path), atol=1e-4, rtol=1e-4)


def test_adapter_file_overwritten_in_place_is_reloaded(graph, tmp_path):
    session, path, staged = load_session(graph, device="cpu"), tmp_path / "live.onnx_adapter", tmp_path / "next"
    first, second = adapted(seed=2), adapted(seed=3)
    write_onnx_adapter(first, path, graph)
    write_onnx_adapter(second, staged, graph)
    torch.testing.assert_close(*run(session, first, X, adapter=path), atol=1e-4, rtol=1e-4)
    before = path.stat()
    with open(path, "r+b") as file:  # same inode, same size: only the stamps (and the bytes) move
        file.write(staged.read_bytes())
    after = path.stat()
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    torch.testing.assert_close(*run(session, second, X, adapter=path), atol=1e-4, rtol=1e-4)


def test_a_rewrite_that_keeps_every_stat_field_is_caught_by_the_content_hash(graph, tmp_path, monkeypatch):
    """A same-size rewrite within one tick of the file system's clock keeps inode, size, mtime and
    ctime: the stat of the first load is replayed to stand for it."""
    session, path, staged = load_session(graph, device="cpu"), tmp_path / "live.onnx_adapter", tmp_path / "next"
    first, second = adapted(seed=2), adapted(seed=3)
    write_onnx_adapter(first, path, graph)
    write_onnx_adapter(second, staged, graph)
    monkeypatch.setattr(runtime, "_RACY_NS", 600 * 10**9)
    torch.testing.assert_close(*run(session, first, X, adapter=path), atol=1e-4, rtol=1e-4)
    frozen, real_stat, key = os.stat(path), os.stat, str(path.resolve())
    with open(path, "r+b") as file:
        file.write(staged.read_bytes())
    monkeypatch.setattr(runtime.os, "stat", lambda p, *a, **k: frozen if str(p) == key else real_stat(p, *a, **k))
    monkeypatch.setattr(runtime, "_RACY_NS", 600 * 10**9)  # however slow this machine is, still within the window
    assert runtime._FileIdentity.of(key).stat == session._adapters[key].identity.stat
    torch.testing.assert_close(*run(session, second, X, adapter=path), atol=1e-4, rtol=1e-4)


def test_a_loaded_adapter_is_a_snapshot_that_a_rewrite_in_place_does_not_reach(graph, tmp_path):
    """onnxruntime's LoraAdapter maps the file: a rewrite in place would change it between (or during)
    runs. A loaded AdapterFile is the session's own copy."""
    session, path, staged = load_session(graph, device="cpu"), tmp_path / "live.onnx_adapter", tmp_path / "next"
    first, second = adapted(seed=2), adapted(seed=3)
    write_onnx_adapter(first, path, graph)
    write_onnx_adapter(second, staged, graph)
    loaded = session.load_adapter(path)
    with open(path, "r+b") as file:
        file.write(staged.read_bytes())
    torch.testing.assert_close(*run(session, first, X, adapter=loaded), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(*run(session, second, X, adapter=path), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"\['down.miss_block.default'\] given as inputs and by the adapter file"):
        session.run({"x": X, "down.miss_block.default": torch.zeros(4, 8)}, adapter=loaded)


def test_a_file_that_stops_fitting_is_refused_not_served_from_the_cache(graph, tmp_path):
    session, path = load_session(graph, device="cpu"), tmp_path / "live.onnx_adapter"
    write_onnx_adapter(adapted(seed=2), path, graph)
    run(session, adapted(seed=2), X, adapter=path)
    write_onnx_adapter(adapted(seed=3, targets=("up",)), path)  # no graph check: down is missing now
    for _ in range(2):  # the old, fitting file is not served from the cache
        with pytest.raises(ValueError, match=r"covers 1 of the graph's 2 blocks; missing 'down.miss_block.default'"):
            session.run({"x": X}, adapter=path)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"live.onnx_adapter not found; write one with"):
        session.run({"x": X}, adapter=path)


# --- 2. a file is checked against the session's graph when it is loaded


def test_partial_adapter_file_is_refused_unless_asked_for(graph, tmp_path):
    session, path = load_session(graph, device="cpu"), tmp_path / "up.onnx_adapter"
    up_only = adapted(seed=5, targets=("up",))
    write_onnx_adapter(up_only, path)  # without model_path: nothing checked at write time
    with pytest.raises(ValueError, match=r"up.onnx_adapter covers 1 of the graph's 2 blocks; missing "
                                         r"'down.miss_block.default': those layers would run the blocks the graph "
                                         r"was exported with.* or pass partial=True"):
        session.run({"x": X}, adapter=path)
    # partial=True: up from the file, down as exported (seed 1's block)
    expected = adapted(seed=1)
    with torch.no_grad():
        expected.up.miss_block["default"].copy_(up_only.up.miss_block["default"])
    torch.testing.assert_close(*run(session, expected, X, adapter=path, partial=True), atol=1e-4, rtol=1e-4)


def test_adapter_written_under_another_adapter_name_is_refused_with_the_option_that_fixes_it(graph, tmp_path):
    session, path = load_session(graph, device="cpu"), tmp_path / "tenant.onnx_adapter"
    tenant = adapted(seed=6, names=("tenant",))
    write_onnx_adapter(tenant, path, adapter_name="tenant")
    with pytest.raises(ValueError, match=r"'up.miss_block.tenant' is not an overridable block of the graph(.|\n)*the "
                                         r"file was written for adapter name\(s\) \['tenant'\] while the graph was "
                                         r"exported with \['default'\]: write it again with write_onnx_adapter\(\.\.\., "
                                         r"as_name='default'\)"):
        session.run({"x": X}, adapter=path)
    with pytest.raises(ValueError, match=r"written for adapter name\(s\) \['tenant'\]"):  # the writer says so too
        write_onnx_adapter(tenant, tmp_path / "checked.onnx_adapter", graph, adapter_name="tenant")
    write_onnx_adapter(tenant, path, graph, adapter_name="tenant", as_name="default")
    torch.testing.assert_close(*run(session, tenant, X, adapter=path), atol=1e-4, rtol=1e-4)


def handmade(path, parameters):
    """An .onnx_adapter written straight with onnxruntime: what a wrong writer would produce."""
    values = {name: np.ascontiguousarray(array) for name, array in parameters.items()}
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in values.items()})
    adapter.export_adapter(str(path))
    return Path(path)


@pytest.mark.parametrize("parameters,message", [
    ({"up.miss_block.default": np.zeros((4, 16), np.float16), "down.miss_block.default": np.zeros((4, 8), np.float32)},
     r"'up.miss_block.default': dtype tensor\(float16\), the graph expects tensor\(float\)"),
    ({"up.miss_block.default": np.zeros((2, 16), np.float32), "down.miss_block.default": np.zeros((4, 8), np.float32)},
     r"'up.miss_block.default': shape \(2, 16\), the graph expects \(4, 16\)"),
    ({"up.miss_stack": np.zeros((3, 4, 16), np.float32), "down.miss_stack": np.zeros((3, 4, 8), np.float32)},
     r"the file holds adapter stacks \(write_onnx_stack\) but the graph has one block per layer"),
], ids=["dtype", "shape", "stack-file"])
def test_adapter_file_that_does_not_fit_is_named_at_load(graph, tmp_path, parameters, message):
    session = load_session(graph, device="cpu")
    path = handmade(tmp_path / "bad.onnx_adapter", parameters)
    with pytest.raises(ValueError, match=rf"bad.onnx_adapter does not fit this graph:(.|\n)*{message}"):
        session.run({"x": X}, adapter=path, partial=True)


# --- 3. adapter ids: int32 is widened, other dtypes are refused by name


@pytest.fixture(scope="module")
def stacked_graph(tmp_path_factory):
    model = stack_adapters(adapted(seed=8, names=("a", "b")))
    path = tmp_path_factory.mktemp("stacked") / "stacked.onnx"
    export_onnx(model, kwargs={"x": torch.randn(2, 3, 12), "adapter_ids": torch.tensor([0, 1])}, path=path)
    return model, path


@pytest.mark.parametrize("io_binding", [False, True], ids=["numpy", "io-binding"])
def test_int32_adapter_ids_equal_int64_ids_in_the_session(stacked_graph, io_binding):
    model, path = stacked_graph
    session = load_session(path, device="cpu", io_binding=io_binding)
    names = ["b", None, "a"]
    ids = adapter_ids_for(model, names)
    (wide,) = session.run({"x": X, "adapter_ids": ids})
    (narrow,) = session.run({"x": X, "adapter_ids": ids.to(torch.int32)})
    torch.testing.assert_close(narrow, wide, atol=0, rtol=0)
    torch.testing.assert_close(narrow, rows_alone(model, X, names, run=call), atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # and PyTorch takes the same int32 ids
        torch.testing.assert_close(model(X, adapter_ids=ids.to(torch.int32)), narrow, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("ids", [torch.tensor([0.0, 1.0, -1.0]), torch.tensor([True, False, True]),
                                 torch.tensor([0, 1, 1], dtype=torch.int16)], ids=["float", "bool", "int16"])
def test_adapter_ids_of_other_dtypes_are_refused_by_name(stacked_graph, ids):
    _, path = stacked_graph
    for io_binding in (False, True):
        session = load_session(path, device="cpu", io_binding=io_binding)
        with pytest.raises(ValueError, match=rf"adapter_ids must be a 1-D int64 \(or int32\) tensor, one id per batch "
                                             rf"row; got {ids.dtype} of shape \(3,\)"):
            session.run({"x": X, "adapter_ids": ids})


def test_inputs_of_another_dtype_are_refused_by_name(stacked_graph):
    _, path = stacked_graph
    session = load_session(path, device="cpu")
    with pytest.raises(TypeError, match=r"input 'x' is torch.float64, and the graph takes torch.float32 "
                                        r"\(tensor\(float\)\); cast it with .to\(torch.float32\)"):
        session.run({"x": X.double(), "adapter_ids": torch.tensor([0, 1, 0])})


def test_a_stack_file_missing_a_layer_is_refused_even_as_partial(stacked_graph, tmp_path):
    """Ids index the file's stacks in some layers and the export's in others: mixed adapters."""
    model, path = stacked_graph
    partial = tmp_path / "partial.onnx_adapter"
    handmade(partial, {"up.miss_stack": model.up.miss_stack.numpy()})
    with pytest.raises(ValueError, match=r"holds stacks for 1 of the graph's 2 overridable inputs \(missing "
                                         r"'down.miss_stack', \.\.\.\): id k would pick the file's k-th adapter"):
        load_session(path, device="cpu").run({"x": X, "adapter_ids": torch.tensor([0, 1, 0])}, adapter=partial,
                                             partial=True)


def test_stack_file_adapter_ids_in_int32(stacked_graph, tmp_path):
    """A stack file with one more adapter, selected with int32 ids: new stacks, same graph. Blocks
    changed in place after stack_adapters are what the file holds, not the stacks of before."""
    model, path = stacked_graph
    grown = adapted(seed=9, names=("a", "b", "c"))
    stack_adapters(grown)
    with torch.no_grad():
        grown.down.miss_block["c"].mul_(-3)
    adapter = write_onnx_stack(grown, tmp_path / "three.onnx_adapter", path)
    names = ["c", "a", None]
    (logits,) = load_session(path, device="cpu").run(
        {"x": X, "adapter_ids": adapter_ids_for(grown, names).to(torch.int32)}, adapter=adapter)
    torch.testing.assert_close(logits, rows_alone(grown, X, names, run=call), atol=1e-4, rtol=1e-4)
