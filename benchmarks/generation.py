"""Table 6: greedy generation with the KV cache: time to first token and decode speed of the adapted
Llama-shaped model on onnxruntime (merged and unmerged with past, unmerged without past), through
onnxruntime-genai, and torch eager PEFT `generate`.

Each contender runs twice per round: one new token (the prefill: time to first token) and all new
tokens; decode per token is (all - first) / (new - 1). Every contender's tokens are checked against
PEFT's generate before timing. Prompts are equal-length (onnxruntime-genai 0.18 does not serve left
padding) and avoid the pad id (genai reads it as padding); min-length settings hold eos back, so
every contender produces exactly the new tokens asked for.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnxruntime
import torch

from miss_compile.export import export_genai_folder, export_onnx, load_session
from miss_compile.timing import interleaved_ms

from .models import SEVEN_PROJECTIONS, peft_miss
from .training import FULL, QUICK

MERGED = "onnxruntime merged, with past"
UNMERGED = "onnxruntime unmerged, with past"
NO_PAST = "onnxruntime unmerged, without past"
GENAI = "onnxruntime-genai merged"
GENAI_UNMERGED = "onnxruntime-genai unmerged, adapter file"
EAGER = "torch eager PEFT generate"
NO_SPINNING = {"session.intra_op.allow_spinning": "0"}  # no core stolen from the next contender's run


@dataclass(frozen=True)
class Setting:
    prompt: int
    new: int
    batches: tuple[int, ...]


FULL_SETTING = Setting(prompt=128, new=64, batches=(1, 8))
QUICK_SETTING = Setting(prompt=32, new=16, batches=(1, 4))
FULL_ROUNDS = 5  # at most: a round generates every contender's tokens twice, no-past included


def _prompts(batch: int, length: int, vocab: int, pad: int) -> torch.Tensor:
    ids = torch.randint(0, vocab - 1, (batch, length), generator=torch.Generator().manual_seed(batch))
    return ids + (ids >= pad).long()  # never the pad id


def _session(path: Path, device: str):
    options = onnxruntime.SessionOptions()
    for key, value in NO_SPINNING.items():
        options.add_session_config_entry(key, value)
    return load_session(path, device=device, session_options=options)


def _genai_runner(folder: Path, adapter: str | None) -> Callable[[torch.Tensor, int], list[list[int]]]:
    import onnxruntime_genai as og

    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"].update(NO_SPINNING)
    (folder / "genai_config.json").write_text(json.dumps(config))  # the benchmark's own temp folder
    model = og.Model(str(folder))
    adapters = og.Adapters(model) if adapter else None
    if adapter:
        adapters.load(str(folder / "adapters" / f"{adapter}.onnx_adapter"), adapter)

    def generate(ids: torch.Tensor, new: int) -> list[list[int]]:
        params = og.GeneratorParams(model)
        total = ids.shape[1] + new
        params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=len(ids))
        generator = og.Generator(model, params)
        if adapter:
            generator.set_active_adapter(adapters, adapter)
        generator.append_tokens(ids.numpy().astype("int32"))  # the prefill: the first token's logits
        while not generator.is_done():
            generator.generate_next_token()
        return [[int(t) for t in generator.get_sequence(row)] for row in range(len(ids))]

    return generate


def _contenders(model: torch.nn.Module, folder: Path, device: str, setting: Setting, eos: int, vocab: int):
    """name -> generate(ids, new) returning token lists."""
    merged = export_genai_folder(model, folder / "merged", merged=True, check=False)
    unmerged = export_genai_folder(model, folder / "unmerged", merged=False, check=False)
    example = _prompts(2, 8, vocab, eos)
    export_onnx(model, kwargs={"input_ids": example, "attention_mask": torch.ones_like(example)},
                path=folder / "no_past.onnx", merged=False)
    sessions = {MERGED: _session(merged.path / "model.onnx", device),
                UNMERGED: _session(unmerged.path / "model.onnx", device),
                NO_PAST: _session(folder / "no_past.onnx", device)}
    adapter_file = unmerged.adapters["default"]

    def on_session(name: str) -> Callable[[torch.Tensor, int], list[list[int]]]:
        adapter = None if name == MERGED else adapter_file  # unmerged: as a server swaps adapters per request
        return lambda ids, new: sessions[name].generate(ids, max_new_tokens=new, adapter=adapter).tolist()

    @torch.no_grad()
    def eager(ids: torch.Tensor, new: int) -> list[list[int]]:
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                              min_new_tokens=new, pad_token_id=eos).tolist()

    contenders = {name: on_session(name) for name in sessions}
    contenders[GENAI] = _genai_runner(merged.path, None)
    contenders[GENAI_UNMERGED] = _genai_runner(unmerged.path, "default")
    contenders[EAGER] = eager
    return contenders


def run(quick: bool, device: str, repeats: int) -> list[dict]:
    shape, r = (QUICK, 8) if quick else (FULL, 64)
    setting = QUICK_SETTING if quick else FULL_SETTING
    model = peft_miss(shape.build(), "balance", r, SEVEN_PROJECTIONS).eval()
    eos = int(model.config.eos_token_id)
    provider = "CUDA" if device == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "CPU"
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        contenders = _contenders(model, Path(folder), device, setting, eos, shape.vocab)
        for batch in setting.batches:
            ids = _prompts(batch, setting.prompt, shape.vocab, eos)
            expected = contenders[EAGER](ids, setting.new)
            for name, generate in contenders.items():
                got = generate(ids, setting.new)
                if got != expected:
                    raise AssertionError(f"generation benchmark: {name}'s tokens differ from PEFT's generate (batch {batch})")
            timed = {}
            for name, generate in contenders.items():
                timed[f"{name}|first"] = lambda g=generate, ids=ids: g(ids, 1)
                timed[f"{name}|all"] = lambda g=generate, ids=ids: g(ids, setting.new)
            # the token check above warmed every contender up; at full size one no-past round is minutes
            times = interleaved_ms(timed, repeats if quick else min(repeats, FULL_ROUNDS), warmup=1)
            decode = {name: (times[f"{name}|all"] - times[f"{name}|first"]) / (setting.new - 1) for name in contenders}
            for name in contenders:
                where = "CPU" if name.startswith("onnxruntime-genai") else provider  # genai: the CPU package here
                rows.append({
                    "table": "generation", "provider": provider,
                    "input": f"batch {batch}, prompt {setting.prompt}, {setting.new} new",
                    "contender": name if where == provider else f"{name} ({where})",
                    "first_token_ms": times[f"{name}|first"], "decode_ms": decode[name],
                    "tokens_per_s": batch * 1e3 / decode[name] if decode[name] > 0 else None,
                    "total_ms": times[f"{name}|all"], "ratio": decode[name] / decode[MERGED],
                })
    return rows


def targets(rows: list[dict]) -> list[tuple[str, float, str, bool]]:
    """Issue 16's targets: unmerged decode <= 1.10x merged per token; with past >= 5x faster than without
    over all new tokens."""
    checks = []
    table = [row for row in rows if row["table"] == "generation"]
    for setting in dict.fromkeys(row["input"] for row in table):
        by_name = {row["contender"]: row for row in table if row["input"] == setting}
        unmerged = by_name[UNMERGED]["ratio"]
        checks.append((f"generation unmerged vs merged decode per token ({setting})", unmerged, "<= 1.10",
                       unmerged <= 1.10))
        speedup = by_name[NO_PAST]["total_ms"] / by_name[UNMERGED]["total_ms"]
        checks.append((f"generation with past vs without, all tokens ({setting})", speedup, ">= 5", speedup >= 5))
    return checks
