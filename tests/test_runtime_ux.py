"""load_session as a user meets it: device="auto" picks what can run, quietly; no warning per
overridable block; numpy arrays in as well as torch tensors, torch tensors out."""

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import build, clone, input_ids, model_output, randomize_blocks

from miss_compile import MissConfig, apply_miss
from miss_compile.export import export_onnx, load_session

pytestmark = pytest.mark.slow

CUDA_WORKS = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime_ux")
    model = apply_miss(clone(build("llama")), MissConfig(r=3, target_modules=["q_proj", "v_proj"], init="random"))
    randomize_blocks(model)
    ids = input_ids()
    export_onnx(model, kwargs={"input_ids": ids}, path=root / "unmerged.onnx", merged=False)
    return model, root / "unmerged.onnx"


def test_auto_device_picks_what_runs_quietly(exported, capfd):
    model, path = exported
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        session = load_session(path)  # device="auto"
    assert session.device == ("cuda" if CUDA_WORKS else "cpu")
    assert session.providers[0] == ("CUDAExecutionProvider" if CUDA_WORKS else "CPUExecutionProvider")
    err = capfd.readouterr().err
    assert "libcublas" not in err and "Failed to create CUDAExecutionProvider" not in err and err == ""
    ids = input_ids(2, 5)
    torch.testing.assert_close(session.run({"input_ids": ids})[0].cpu(), model_output(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(CUDA_WORKS, reason="a CUDA machine: device='cuda' runs there (tests/test_cuda.py)")
def test_explicit_cuda_without_cuda_warns_with_the_reason_and_no_onnxruntime_error(exported, capfd):
    import miss_compile.export.runtime as runtime

    _, path = exported
    runtime._warned_cpu_fallback = False
    capfd.readouterr()
    with pytest.warns(RuntimeWarning, match=r"onnxruntime runs on the CPU: (this onnxruntime build has no CUDA "
                                            r"provider|torch sees no CUDA device)"):
        session = load_session(path, device="cuda")
    assert session.device == "cpu" and session.providers == ["CPUExecutionProvider"]
    assert "libcublas" not in capfd.readouterr().err


def test_unknown_device_is_refused(exported):
    with pytest.raises(ValueError, match=r"device must be 'auto', 'cuda' or 'cpu', got 'gpu'"):
        load_session(exported[1], device="gpu")


def test_no_warning_per_overridable_block(exported, capfd):
    _, path = exported
    capfd.readouterr()
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # plain onnxruntime: one per block
    plain = capfd.readouterr().err
    assert plain.count("appears in graph inputs") == 4
    load_session(path, device="cpu")
    quiet = ort.SessionOptions()
    quiet.intra_op_num_threads = 1  # options for threads, as servers pass them: still quiet
    load_session(path, device="cpu", session_options=quiet)
    assert "appears in graph inputs" not in capfd.readouterr().err
    assert quiet.log_severity_level == 3
    verbose = ort.SessionOptions()
    verbose.log_severity_level = 1  # a caller who asks for more keeps it
    load_session(path, device="cpu", session_options=verbose)
    assert verbose.log_severity_level == 1
    capfd.readouterr()


def test_plain_onnxruntime_is_quiet_with_the_readme_setting(exported, capfd):
    """What README tells plain-onnxruntime users."""
    _, path = exported
    options = ort.SessionOptions()
    options.log_severity_level = 3
    capfd.readouterr()
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert "appears in graph inputs" not in capfd.readouterr().err


@pytest.mark.parametrize("io_binding", [False, True], ids=["plain", "io_binding"])
def test_numpy_inputs_equal_torch_inputs(exported, io_binding):
    model, path = exported
    session = load_session(path, device="cpu", io_binding=io_binding)
    ids = input_ids(3, 6)
    want = model_output(model, ids)
    from_torch = session.run({"input_ids": ids})[0]
    from_numpy = session.run({"input_ids": ids.numpy()})[0]
    widened = session.run({"input_ids": ids.numpy().astype(np.int32)})[0]  # int32 ids widen, as for torch
    frozen = ids.numpy().copy()
    frozen.flags.writeable = False
    read_only = session.run({"input_ids": frozen})[0]
    for logits in (from_torch, from_numpy, widened, read_only):
        assert isinstance(logits, torch.Tensor)
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(from_numpy, from_torch, atol=0, rtol=0)


def test_other_input_types_are_named(exported):
    session = load_session(exported[1], device="cpu")
    with pytest.raises(TypeError, match=r"input 'input_ids' must be a torch tensor or a numpy array, got list"):
        session.run({"input_ids": [[1, 2, 3], [4, 5, 6]]})
    with pytest.raises(TypeError, match=r"input 'input_ids' is torch.float32, and the graph takes torch.int64"):
        session.run({"input_ids": np.zeros((2, 3), dtype=np.float32)})


def test_input_dtype_names_the_graph_inputs_and_blocks(exported):
    session = load_session(exported[1], device="cpu")
    assert session.input_dtype("input_ids") == torch.int64
    assert {session.input_dtype(name) for name in session.overridable_names} == {torch.float32}
    with pytest.raises(KeyError, match=r"'past_key_values.0.key' is not an input of this graph; it takes \['input_ids"):
        session.input_dtype("past_key_values.0.key")
