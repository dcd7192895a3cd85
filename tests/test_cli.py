"""miss-export as a user meets it: mistakes exit 2 with one message (traceback only with --debug),
--help / --version, the base model alone, every written file listed, bf16 refused up front, adapter
names, `inspect`, and the library noise it filters."""

import importlib.metadata
import logging
import re
import subprocess
import sys
import warnings

import peft
import pytest
import torch
from helpers import build, clone, input_ids, model_output, randomize_blocks

from miss_compile import MissConfig, apply_miss, save_adapter
from miss_compile.export import load_session, write_onnx_adapter
from miss_compile.export.cli import EXIT_FAILED, EXIT_USAGE, main
from miss_compile.export.inspection import describe
from miss_compile.quiet import quiet_library_noise

pytestmark = pytest.mark.slow

MINI = MissConfig(r=3, variant="mini", mini_r=8, target_modules=["q_proj", "v_proj"], init="random")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A base model folder, our MiSS adapter (mini), a PEFT MiSS adapter (bat) and a PEFT LoRA adapter."""
    root = tmp_path_factory.mktemp("cli")
    base = build("llama")
    base.save_pretrained(root / "base")
    model = apply_miss(clone(base), MINI)
    randomize_blocks(model)
    save_adapter(model, root / "mini")
    theirs = peft.get_peft_model(clone(base), peft.MissConfig(r=8, init_weights="bat", target_modules=["q_proj"]))
    theirs.save_pretrained(root / "peft_bat")
    lora = peft.get_peft_model(clone(base), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    lora.save_pretrained(root / "lora")
    head = peft.get_peft_model(clone(base), peft.MissConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    head.save_pretrained(root / "peft_head")
    return root, base, model


@pytest.fixture(scope="module")
def unmerged(folders):
    """One CLI export, unmerged, with the adapter named 'foo' in the graph."""
    root, _, _ = folders
    out = root / "out" / "model.onnx"
    assert main([str(root / "base"), "--adapter", str(root / "mini"), "-o", str(out), "--unmerged",
                 "--adapter-name", "foo"]) == 0
    return out


@pytest.fixture(scope="module")
def base_only(folders):
    root, _, _ = folders
    out = root / "base_out" / "base.onnx"
    assert main([str(root / "base"), "-o", str(out)]) == 0
    return out


def _fails(argv, capsys, status=EXIT_USAGE):
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == status
    return capsys.readouterr()


MISTAKES = {  # (argv after the folders are filled in, what the message says)
    "lora-as-adapter": (["{base}", "--adapter", "{lora}"], r"peft_type is 'LORA', expected 'MISS'"),
    "no-such-adapter": (["{base}", "--adapter", "{root}/nope"], r"--adapter .*nope is not a folder"),
    "model-as-adapter": (["{base}", "--adapter", "{base}"], r"is a transformers model folder \(config.json\), not an adapter"),
    "adapter-as-base": (["{mini}", "--adapter", "{mini}"], r"BASE .*mini is an adapter folder.*--adapter"),
    "not-a-model-folder": (["{root}", "--adapter", "{mini}"], r"is not a transformers model folder \(no config.json\)"),
    "unmerged-without-adapter": (["{base}", "--unmerged"], r"--unmerged keeps MiSS blocks apart.*drop --unmerged"),
    "unmerged-with-saved-modules": (["{base}", "--adapter", "{head}", "--unmerged"],
                                    r"--unmerged: .*peft_head trains whole modules too.*lm_head.*drop --unmerged"),
    "genai-unmerged-with-saved-modules": (
        ["{base}", "--adapter", "{head}", "--unmerged", "--task", "text-generation-with-past"],
        r"--unmerged: .*trains whole modules too.*drop --unmerged"),
    "bf16": (["{base}", "--adapter", "{mini}", "--dtype", "bf16"],
             r"--dtype bf16: .*CPU provider, which has no bf16 kernels.*--dtype fp16.*--device cuda.*fp32"),
    "batch-of-one": (["{base}", "--batch", "1"], r"argument --batch: 1 is too small: the example sizes must be >= 2"),
    "seq-of-one": (["{base}", "--seq", "1"], r"argument --seq: 1 is too small"),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_user_mistakes_exit_2_with_the_message_and_no_traceback(folders, tmp_path, capsys, case):
    root, _, _ = folders
    argv, message = MISTAKES[case]
    paths = {"base": root / "base", "lora": root / "lora", "mini": root / "mini", "head": root / "peft_head", "root": root}
    out = tmp_path / "model.onnx"
    printed = _fails([arg.format(**paths) for arg in argv] + ["-o", str(out)], capsys)
    assert printed.err.count("\n") <= 7  # the message (argparse adds its usage lines)
    assert re.search(message, printed.err), printed.err
    assert "Traceback" not in printed.err
    assert not out.exists() and not out.with_suffix(".onnx_adapter").exists()
    if case in ("bf16", "unmerged-without-adapter", "no-such-adapter", "model-as-adapter", "adapter-as-base",
                "unmerged-with-saved-modules", "genai-unmerged-with-saved-modules"):
        assert "[1/" not in printed.out  # refused before anything loads


def test_debug_prints_the_traceback_and_keeps_the_status(folders, tmp_path, capsys):
    root, _, _ = folders
    printed = _fails([str(root / "base"), "--adapter", str(root / "lora"), "-o", str(tmp_path / "m.onnx"), "--debug"],
                     capsys)
    assert "Traceback (most recent call last)" in printed.err and "ValueError" in printed.err
    assert printed.err.rstrip().endswith("peft_type is 'LORA', expected 'MISS': this is not a MiSS adapter")


def test_a_failure_that_is_not_a_mistake_exits_1_and_points_at_debug(folders, tmp_path, capsys, monkeypatch):
    import miss_compile.export.cli as cli

    def broken(*args, **kwargs):
        raise RuntimeError("onnxruntime fell over")

    monkeypatch.setattr(cli, "export_onnx", broken)
    root, _, _ = folders
    printed = _fails([str(root / "base"), "-o", str(tmp_path / "m.onnx")], capsys, status=EXIT_FAILED)
    assert "miss-export: failed: RuntimeError: onnxruntime fell over (run again with --debug for the traceback)" \
        in printed.err
    assert "Traceback" not in printed.err


def test_the_process_exit_status_is_the_contract(tmp_path):
    """Through a real process: status 2, one line on stderr, nothing on stdout."""
    done = subprocess.run([sys.executable, "-m", "miss_compile.export.cli", "inspect", str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip() == (f"miss-export inspect: error: {tmp_path / 'nope'} not found; inspect takes an "
                                   "adapter folder, an .onnx or an .onnx_adapter")


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["--version"])
    assert raised.value.code == 0
    assert capsys.readouterr().out.strip() == f"miss-export (miss-compile) {importlib.metadata.version('miss-compile')}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, explained in {"--adapter DIR": "without it the base model alone", "--unmerged": "swapped in per run",
                              "--adapter-name NAME": "as_name=NAME", "--dtype": "bf16 is refused",
                              "--device": "auto: CUDA when it can start", "--batch": ">= 2", "--seq": ">= 2",
                              "--debug": "full traceback", "--version": "version", "-o OUT.onnx": "OUT.onnx.data"}.items():
        assert option in text and explained in text, option
    assert "examples: miss-export ./llama --adapter ./my-miss-adapter -o model.onnx" in text
    for command in ("inspect", "to-lora"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "example: miss-export " + command in " ".join(capsys.readouterr().out.split())


def test_base_model_alone_exports_and_equals_the_base_model(folders, base_only, capsys):
    _, base, _ = folders
    ids = input_ids(3, 6)
    logits = load_session(base_only, device="cpu").run({"input_ids": ids})[0]
    torch.testing.assert_close(logits, model_output(base, ids), atol=1e-4, rtol=1e-4)
    assert not base_only.with_suffix(".onnx_adapter").exists()


def test_summary_lists_every_file_written(folders, tmp_path, capsys):
    root, _, model = folders
    out = tmp_path / "m.onnx"
    assert main([str(root / "base"), "--adapter", str(root / "mini"), "-o", str(out), "--unmerged"]) == 0
    printed = capsys.readouterr()
    written = [line.split()[1] for line in printed.out.splitlines() if line.startswith("  wrote ")]
    assert written == [str(out), str(out.with_suffix(".onnx_adapter"))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx_adapter"]
    assert f"{out.stat().st_size / 1e6:.2f} MB" in printed.out
    assert "torchvision is not installed" not in printed.err and "LeafSpec" not in printed.err
    ids = input_ids(2, 5)
    swapped = load_session(out, device="cpu").run({"input_ids": ids}, adapter=out.with_suffix(".onnx_adapter"))[0]
    torch.testing.assert_close(swapped, model_output(model, ids), atol=1e-4, rtol=1e-4)


def test_adapter_name_reaches_the_graph_and_a_mismatch_names_the_fix(folders, unmerged, tmp_path):
    root, _, model = folders
    ids = input_ids(2, 5)
    session = load_session(unmerged, device="cpu")
    assert all(name.endswith(".miss_block.foo") for name in session.overridable_names) and session.overridable_names
    logits = session.run({"input_ids": ids}, adapter=unmerged.with_suffix(".onnx_adapter"))[0]
    torch.testing.assert_close(logits, model_output(model, ids), atol=1e-4, rtol=1e-4)
    fix = r"write it again with write_onnx_adapter\(\.\.\., as_name='foo'\), or export the graph with the file's name \(miss-export --adapter-name default\)"
    with pytest.raises(ValueError, match=r"written for adapter name\(s\) \['default'\] while the graph was exported with "
                                         r"\['foo'\]: " + fix):
        write_onnx_adapter(root / "mini", tmp_path / "a.onnx_adapter", unmerged)
    unchecked = write_onnx_adapter(root / "mini", tmp_path / "a.onnx_adapter")  # no model_path: checked at load
    with pytest.raises(ValueError, match=fix):
        session.run({"input_ids": ids}, adapter=unchecked)
    write_onnx_adapter(root / "mini", tmp_path / "b.onnx_adapter", unmerged, as_name="foo")  # the fix works
    torch.testing.assert_close(session.run({"input_ids": ids}, adapter=tmp_path / "b.onnx_adapter")[0], logits)


def test_adapter_files_against_a_merged_graph_say_it_is_merged(folders, base_only, tmp_path):
    root, _, _ = folders
    with pytest.raises(ValueError, match=r"base.onnx has no overridable blocks: it is a merged export .*merged=False "
                                         r"\(miss-export --unmerged\)"):
        write_onnx_adapter(root / "mini", tmp_path / "a.onnx_adapter", base_only)
    assert not (tmp_path / "a.onnx_adapter").exists()
    path = write_onnx_adapter(root / "mini", tmp_path / "a.onnx_adapter")
    with pytest.raises(ValueError, match=r"a.onnx_adapter: this session's graph has no overridable blocks: it is a merged"):
        load_session(base_only, device="cpu").run({"input_ids": input_ids()}, adapter=path)


# --- inspect


def test_inspect_an_adapter_folder_ours_and_peft(folders, capsys):
    root, _, _ = folders
    text = describe(root / "mini")
    assert "variant mini, r 3, mini_r 8, 4 layers, blocks float32, ranks 3" in text
    assert "model.layers.*.self_attn.q_proj  x2   [3, 8]" in text
    assert "model.layers.*.self_attn.v_proj  x2   [3, 8]" in text
    text = describe(root / "peft_bat")
    assert "variant bat, r 8, 2 layers" in text
    assert "model.layers.*.self_attn.q_proj  x2   [4, 8, 8]" in text  # [out // r, r, r] with out 32
    assert main(["inspect", str(root / "mini")]) == 0
    assert capsys.readouterr().out.strip() == describe(root / "mini")


def test_inspect_graphs_and_adapter_files(unmerged, base_only, capsys):
    text = describe(unmerged)
    assert "unmerged (MiSS blocks are overridable graph inputs" in text
    assert "adapter name 'foo', variant " in text and "ranks 3, 4 layers, float32" in text
    assert "model.layers.*.self_attn.v_proj  x2   [3, 8]" in text
    assert "inputs: input_ids int64 [batch, sequence]" in text
    text = describe(unmerged.with_suffix(".onnx_adapter"))
    assert "4 parameters" in text and "adapter name 'foo'" in text and "ranks 3, 4 layers, float32" in text
    assert "model.layers.*.self_attn.q_proj  x2   [3, 8]" in text
    assert "no overridable blocks, so .onnx_adapter files do not apply" in describe(base_only)
    assert main(["inspect", str(unmerged), str(base_only)]) == 0
    assert capsys.readouterr().out.strip() == describe(unmerged) + "\n\n" + describe(base_only)


@pytest.mark.parametrize("what, message", [
    ("lora", r"peft_type is 'LORA', expected 'MISS'"),
    ("base", r"is a transformers model folder \(config.json\): inspect takes an adapter folder"),
    ("notes.txt", r"not a .txt file"),
])
def test_inspect_mistakes_exit_2(folders, capsys, what, message):
    root, _, _ = folders
    (root / "notes.txt").write_text("hello")
    assert re.search(message, _fails(["inspect", str(root / what)], capsys).err)


# --- quiet


def test_library_noise_is_filtered_narrowly(caplog):
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught, quiet_library_noise():
        registration.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
        registration.warning("something else")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
        warnings.warn("# The axis name: sequence will not be used, since it shares the same shape constraints "
                      "with another axis: sequence.", UserWarning, stacklevel=1)
    assert [r.getMessage() for r in caplog.records] == ["something else"]
    assert [str(w.message) for w in caught] == ["another deprecation"]
    caplog.clear()
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        registration.warning("torchvision is not installed. Skipping %s", "torchvision::nms")  # outside: shown
    assert len(caplog.records) == 1 and len(caught) == 1



def test_an_ort_lora_adapter_with_another_name_or_on_a_merged_graph_is_named(folders, unmerged, base_only, tmp_path):
    """onnxruntime's own LoraAdapter is fed unchecked; its 'Invalid input name' is said in graph terms."""
    import onnxruntime as ort

    root, _, _ = folders
    adapter = ort.LoraAdapter()
    adapter.Load(str(write_onnx_adapter(root / "mini", tmp_path / "default.onnx_adapter")))
    with pytest.raises(ValueError, match=r"the ort.LoraAdapter holds blocks for adapter name 'default' .* exported with "
                                         r"\['foo'\]: write the file again with write_onnx_adapter\(\.\.\., as_name='foo'\)"):
        load_session(unmerged, device="cpu").run({"input_ids": input_ids()}, adapter=adapter)
    with pytest.raises(ValueError, match=r"this session's graph has no overridable blocks: it is a merged export"):
        load_session(base_only, device="cpu").run({"input_ids": input_ids()}, adapter=adapter)
    fitting = ort.LoraAdapter()
    fitting.Load(str(write_onnx_adapter(root / "mini", tmp_path / "foo.onnx_adapter", unmerged, as_name="foo")))
    session = load_session(unmerged, device="cpu")
    torch.testing.assert_close(session.run({"input_ids": input_ids()}, adapter=fitting)[0],
                               session.run({"input_ids": input_ids()}, adapter=tmp_path / "foo.onnx_adapter")[0])
