"""ONNX export on onnxruntime (CPU provider here): parity, dynamic sizes, merged = base graph, adapter swaps."""

import collections
import os

import onnx
import onnxruntime as ort
import peft
import pytest
import torch
from cases import CONFIGS
from helpers import build, clone, input_ids, model_output, randomize_blocks

from miss_compile import apply_miss, save_adapter
from miss_compile.export import export_onnx, load_session, write_onnx_adapter
from miss_compile.export.onnx import BLOCK_MARKER

pytestmark = pytest.mark.slow

def adapted(model_name="llama", variant="balance", seed=2):
    base = build(model_name)
    model = apply_miss(clone(base), CONFIGS[variant])
    randomize_blocks(model, seed=seed)
    return base, model


def run(session, ids):
    (logits,) = session.run({"input_ids": ids})[:1]
    return logits


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One export per (variant, merged) on the tiny Llama, shared by the tests below."""
    folder = tmp_path_factory.mktemp("onnx")
    results = {}
    for variant in CONFIGS:
        base, model = adapted(variant=variant)
        for merged in (True, False):
            result = export_onnx(model, kwargs={"input_ids": input_ids(2, 7)}, path=folder / f"{variant}-{merged}.onnx",
                                 merged=merged)
            results[variant, merged] = (model, result)
    base_result = export_onnx(build("llama"), kwargs={"input_ids": input_ids(2, 7)}, path=folder / "base.onnx")
    return results, base_result, folder


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "unmerged"])
@pytest.mark.parametrize("variant", list(CONFIGS))
def test_onnxruntime_matches_torch_at_other_sizes(exports, variant, merged):
    model, result = exports[0][variant, merged]
    assert result.max_abs_error < 1e-4
    onnx.checker.check_model(str(result.path))
    session = load_session(result.path, device="cpu")
    for batch, seq in [(1, 1), (3, 12)]:
        ids = input_ids(batch, seq, seed=batch + seq)
        torch.testing.assert_close(run(session, ids), model_output(model, ids), atol=1e-4, rtol=1e-4)
    assert len(result.block_inputs) == (0 if merged else 14)


def _op_counts(path):
    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_merged_graph_is_the_base_models_graph(exports, variant):
    _, result = exports[0][variant, True]
    assert _op_counts(result.path) == _op_counts(exports[1].path)
    graph = onnx.load(str(result.path)).graph
    assert not [i.name for i in graph.input if BLOCK_MARKER in i.name]


@pytest.mark.parametrize("variant,function", [("balance", "MissLinear"), ("mini", "MissLinear"), ("bat", "BatLinear")])
def test_unmerged_graph_calls_one_local_function_per_layer(exports, variant, function):
    _, result = exports[0][variant, False]
    model = onnx.load(str(result.path))
    calls = [node for node in model.graph.node if node.domain == "miss"]
    assert [node.op_type for node in calls] == [function] * 14
    overloads = {f.overload for f in model.functions if f.domain == "miss" and f.name == function}
    assert "model.layers.0.self_attn.q_proj" in overloads and len(overloads) == 14
    bodies = {op for f in model.functions for op in (node.op_type for node in f.node)}
    assert bodies <= {"MatMul", "Transpose", "Add", "Pad", "Shape", "Slice", "Concat", "Reshape", "ReduceSum", "Tile",
                      "Unsqueeze", "Cast", "Constant"}  # standard ops only


def test_unmerged_blocks_are_overridable_inputs(exports):
    _, result = exports[0]["bat", False]
    graph = onnx.load(str(result.path)).graph
    initializers = {i.name for i in graph.initializer}
    blocks = [i.name for i in graph.input if BLOCK_MARKER in i.name]
    assert len(blocks) == 14 and set(blocks) <= initializers
    assert "model.layers.0.self_attn.q_proj.miss_block.default" in blocks


@pytest.mark.parametrize("variant", ["balance", "bat"])
def test_adapter_file_swap_equals_fresh_export(exports, tmp_path, variant):
    _, result = exports[0][variant, False]
    _, other = adapted(variant=variant, seed=9)
    save_adapter(other, tmp_path / "peft-format")
    checked = write_onnx_adapter(tmp_path / "peft-format", tmp_path / "other.onnx_adapter", result.path)
    unchecked = write_onnx_adapter(other, tmp_path / "from-model.onnx_adapter")  # from a model, no graph check
    formats = [ort.AdapterFormat.read_adapter(str(p)) for p in (checked, unchecked)]  # own the memory
    checked_values, unchecked_values = (
        {name: value.numpy().copy() for name, value in adapter.get_parameters().items()} for adapter in formats)
    assert checked_values.keys() == unchecked_values.keys() and len(checked_values) == 14
    assert all((checked_values[name] == unchecked_values[name]).all() for name in checked_values)
    adapter_file = checked
    fresh = export_onnx(other, kwargs={"input_ids": input_ids(2, 7)}, path=tmp_path / "fresh.onnx", validate=False)
    session, fresh_session = load_session(result.path, device="cpu"), load_session(fresh.path, device="cpu")
    ids = input_ids(2, 9, seed=4)
    swapped = session.run({"input_ids": ids}, adapter=adapter_file)[0]
    torch.testing.assert_close(swapped, run(fresh_session, ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(swapped, model_output(other, ids), atol=1e-4, rtol=1e-4)
    # without the adapter the session still runs its own blocks
    torch.testing.assert_close(run(session, ids), model_output(exports[0][variant, False][0], ids), atol=1e-4, rtol=1e-4)


def test_io_binding_path_equals_plain_runs(exports):
    """The binding code CUDA uses, exercised on the CPU provider."""
    _, result = exports[0]["mini", False]
    plain, bound = load_session(result.path, device="cpu"), load_session(result.path, device="cpu", io_binding=True)
    ids = input_ids(2, 6, seed=12)
    torch.testing.assert_close(bound.run({"input_ids": ids})[0], plain.run({"input_ids": ids})[0], atol=0, rtol=0)


def test_adapter_that_does_not_fit_is_named(exports, tmp_path):
    _, result = exports[0]["balance", False]
    _, bat = adapted(variant="bat")
    with pytest.raises(ValueError, match=r"q_proj.miss_block.default': shape \(4, 8, 8\), the graph expects \(3, 32\)"):
        write_onnx_adapter(bat, tmp_path / "bad.onnx_adapter", result.path)
    assert not list(tmp_path.iterdir())


def test_peft_model_exports_unmerged(tmp_path):
    base = build("llama")
    theirs = peft.get_peft_model(clone(base), CONFIGS["mini"].to_peft())
    randomize_blocks(theirs)
    theirs.eval()
    result = export_onnx(theirs, kwargs={"input_ids": input_ids()}, path=tmp_path / "peft.onnx")
    assert len(result.block_inputs) == 14
    ids = input_ids(3, 4, seed=5)
    torch.testing.assert_close(run(load_session(result.path, device="cpu"), ids), model_output(theirs, ids),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_name,variant", [("qwen2", "bat"), ("bert", "mini"), ("gpt2", "balance")])
def test_other_models_unmerged(tmp_path, model_name, variant):
    _, model = adapted(model_name, variant)
    result = export_onnx(model, kwargs={"input_ids": input_ids()}, path=tmp_path / "m.onnx")
    assert len(result.block_inputs) == sum(".miss_block." in n for n, _ in model.named_parameters())
    ids = input_ids(3, 5, seed=6)
    torch.testing.assert_close(run(load_session(result.path, device="cpu"), ids), model_output(model, ids),
                               atol=1e-4, rtol=1e-4)


def test_fp16_export_parity(tmp_path):
    _, model = adapted(variant="balance")
    result = export_onnx(model, kwargs={"input_ids": input_ids()}, path=tmp_path / "fp16.onnx", dtype=torch.float16,
                         external_data=True)
    assert (tmp_path / "fp16.onnx.data").is_file()  # weights beside the graph, as past 2 GB
    graph = onnx.load(str(result.path)).graph
    block = next(i for i in graph.initializer if BLOCK_MARKER in i.name)
    assert block.data_type == onnx.TensorProto.FLOAT16
    ids = input_ids(2, 6, seed=8)
    logits = run(load_session(result.path, device="cpu"), ids)
    assert logits.dtype == torch.float16
    torch.testing.assert_close(logits.float(), model_output(model, ids), atol=5e-2, rtol=5e-2)


def test_cuda_request_without_cuda_warns_once_and_runs_on_cpu(exports):
    import miss_compile.export.runtime as runtime

    _, result = exports[0]["balance", False]
    if "CUDAExecutionProvider" in runtime.ort.get_available_providers() and torch.cuda.is_available():
        pytest.skip("a CUDA machine: the fallback path does not apply")  # the cuda tests cover it there
    runtime._warned_cpu_fallback = False
    with pytest.warns(RuntimeWarning, match="onnxruntime runs on the CPU"):
        session = load_session(result.path, device="cuda")
    assert session.device == "cpu"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_session(result.path, device="cuda")  # once only


def test_dynamic_export_refuses_size_one_examples(tmp_path):
    _, model = adapted()
    with pytest.raises(ValueError, match=r"example input 'input_ids' has shape \(1, 7\); a dynamic export needs"):
        export_onnx(model, kwargs={"input_ids": input_ids(1, 7)}, path=tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_failed_export_leaves_no_file(tmp_path):
    _, model = adapted()
    target = tmp_path / "model.onnx"
    with pytest.raises(ValueError, match="opset=17"):
        export_onnx(model, kwargs={"input_ids": input_ids()}, path=target, opset=17)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("unmerged", [False, True], ids=["merged", "unmerged"])
def test_cli_end_to_end_on_saved_folders(tmp_path, capsys, unmerged):
    base = build("llama")
    base.save_pretrained(tmp_path / "base")
    theirs = peft.get_peft_model(clone(base), CONFIGS["bat"].to_peft())
    randomize_blocks(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    from miss_compile.export.cli import main

    out = tmp_path / "out" / "model.onnx"
    argv = [str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "-o", str(out)]
    assert main(argv + (["--unmerged"] if unmerged else [])) == 0
    printed = capsys.readouterr().out
    assert "[1/" in printed and "summary: " in printed and "max abs error vs torch" in printed
    ids = input_ids(2, 5, seed=3)
    session = load_session(out, device="cpu")
    torch.testing.assert_close(run(session, ids), model_output(theirs.eval(), ids), atol=1e-4, rtol=1e-4)
    assert out.with_suffix(".onnx_adapter").is_file() == unmerged
    if unmerged:
        swapped = session.run({"input_ids": ids}, adapter=out.with_suffix(".onnx_adapter"))[0]
        torch.testing.assert_close(swapped, model_output(theirs, ids), atol=1e-4, rtol=1e-4)


def test_export_refuses_adapter_names(tmp_path):
    _, model = adapted()
    with pytest.raises(ValueError, match=r"export_onnx takes adapter_ids, not adapter_names.*adapter_ids_for"):
        export_onnx(model, kwargs={"input_ids": input_ids(), "adapter_names": ["default", None]}, path=tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_adapter_for_a_graph_block_in_an_unwritable_dtype_is_refused(tmp_path):
    """.onnx_adapter parameters follow the graph's dtype; a bf16 block must not silently become fp32."""
    name = "model.layers.0.self_attn.q_proj.miss_block.default"
    block = onnx.helper.make_tensor(name, onnx.TensorProto.BFLOAT16, [3, 32], [0] * 96)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", [name], ["y"])], "g",
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.BFLOAT16, [3, 32])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.BFLOAT16, [3, 32])], [block])
    graph_path = tmp_path / "bf16.onnx"
    onnx.save(onnx.helper.make_model(graph, ir_version=10), str(graph_path))
    _, model = adapted()
    with pytest.raises(NotImplementedError, match=rf"graph input '{name}' is BFLOAT16, and .onnx_adapter files are"):
        write_onnx_adapter(model, tmp_path / "a.onnx_adapter", graph_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16.onnx"]


def test_written_files_are_readable_as_the_umask_allows(tmp_path):
    """Staged files are created like open() creates them (0o666 less the umask), not mkstemp's 0o600."""
    _, model = adapted()
    previous = os.umask(0o022)
    try:
        save_adapter(model, tmp_path / "adapter")
        write_onnx_adapter(model, tmp_path / "a.onnx_adapter")
    finally:
        os.umask(previous)
    written = [tmp_path / "a.onnx_adapter", *(tmp_path / "adapter").iterdir()]
    assert len(written) == 3 and all(p.stat().st_mode & 0o777 == 0o644 for p in written), \
        {p.name: oct(p.stat().st_mode & 0o777) for p in written}
