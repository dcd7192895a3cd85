"""transformers' Trainer with miss_backend, the way that keeps the Trainer's data path as it is:
`model.compile(backend="miss")` (the module compiles in place and keeps `forward`'s signature, so the
Trainer keeps every batch column) and TrainingArguments without torch_compile (accelerate's backend list
refuses "miss"). Real SGD steps on a PEFT MiSS model equal the same steps in eager PEFT."""

import copy
import logging

import peft
import pytest
import torch
import transformers
from small_models import DECODER, VOCAB

from miss_compile import miss_backend
from miss_compile.peft_compat import named_miss_layers

pytestmark = pytest.mark.slow


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**DECODER, "num_hidden_layers": 1}))


def tiny_peft_llama() -> peft.PeftModel:
    return peft.get_peft_model(tiny_llama(), peft.MissConfig(r=4, target_modules="all-linear"))


def dataset() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (8, 8), generator=generator)
    mask = torch.ones_like(ids)
    mask[::2, :2] = 0  # the mask must reach the model: a dropped column would change the loss
    return [{"input_ids": row, "attention_mask": m, "labels": row} for row, m in zip(ids, mask, strict=True)]


def train(model: torch.nn.Module, output_dir: str) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=4, max_steps=3, optim="sgd", learning_rate=0.5,
        lr_scheduler_type="constant", use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset())
    trainer.train()
    return trainer


def losses(trainer: transformers.Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_steps_on_a_compiled_peft_model_equal_eager_and_train_only_the_blocks(tmp_path, caplog):
    model = tiny_peft_llama()
    eager = copy.deepcopy(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    reports = len(miss_backend.graph_pass.reports)

    model.compile(backend="miss")  # the recipe: compile in place, hand the Trainer the model itself
    with caplog.at_level(logging.WARNING, logger="miss_compile"):
        trainer = train(model, str(tmp_path / "compiled"))
    expected = train(eager, str(tmp_path / "eager"))

    rewritten = [len(report.rewritten) for report in miss_backend.graph_pass.reports[reports:]]
    assert rewritten and all(count == 7 for count in rewritten), rewritten  # the training graph ran miss ops
    assert [r for r in caplog.records if r.name.startswith("miss_compile")] == []  # a full rewrite is quiet
    assert len(losses(trainer)) == 3
    torch.testing.assert_close(losses(trainer), losses(expected), rtol=1e-5, atol=1e-6)

    eager_parameters = dict(eager.named_parameters())
    blocks = [name for name, _ in model.named_parameters() if name.endswith(".miss_block.default")]
    assert len(blocks) == 7
    for name, parameter in model.named_parameters():
        if name in blocks:
            assert not torch.equal(parameter, before[name]), f"{name} did not train"
            torch.testing.assert_close(parameter, eager_parameters[name], rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(parameter, before[name]), f"base weight {name} changed"

    # What the Trainer saves is PEFT's own checkpoint: model.compile adds no _orig_mod. prefix.
    trainer.save_model(str(tmp_path / "saved"))
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "saved"))
    for name, layer in named_miss_layers(loaded).items():
        torch.testing.assert_close(layer.miss_block["default"], named_miss_layers(model)[name].miss_block["default"],
                                   rtol=0, atol=0)


def test_the_routes_that_surprise_are_still_what_the_readme_says(tmp_path):
    """accelerate refuses torch_compile_backend="miss"; an OptimizedModule loses the batch columns
    (the Trainer reads the wrapper's forward(*args, **kwargs)). If either changes, update the README."""
    args = transformers.TrainingArguments(output_dir=str(tmp_path), torch_compile_backend="miss", use_cpu=True,
                                          report_to=[])
    with pytest.raises(ValueError, match="not a valid DynamoBackend"):
        transformers.Trainer(model=tiny_peft_llama(), args=args, train_dataset=dataset())
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                          per_device_train_batch_size=4)
    wrapped = transformers.Trainer(model=torch.compile(tiny_peft_llama(), backend="miss"), args=args,
                                   train_dataset=dataset())
    assert list(next(iter(wrapped.get_train_dataloader()))) == []
    model = tiny_peft_llama()
    model.compile(backend="miss")
    in_place = transformers.Trainer(model=model, args=args, train_dataset=dataset())
    assert sorted(next(iter(in_place.get_train_dataloader()))) == ["attention_mask", "input_ids", "labels"]
