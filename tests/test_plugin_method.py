"""A method is a plug-in: one registered from this test file trains, evaluates, saves, loads and reports like the
built-in ones, with its own loss term, predictive and input check, and nothing else of bayeslora changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import bayeslora as bl
from _toy_models import write_word_task
from bayeslora.methods import METHODS, TrainingExtras, register_method
from bayeslora.methods.lora import Lora
from bayeslora.reporting.report import run_report
from bayeslora.runs.adapters import load_adapter
from bayeslora.training.losses import LossTerms


def _b_penalty(model, trainer) -> LossTerms:
    """0.1·Σ‖B‖², the toy method's own loss term."""
    squares = [p.square().sum() for name, p in model.named_parameters() if "lora_B" in name and p.requires_grad]
    return LossTerms(terms={"b_penalty": 0.1 * torch.stack(squares).sum()})


def _with_and_without_adapter(model, scorer, batch):
    """The toy predictive: the mean of the adapted model's and the base model's probabilities (2 "samples")."""
    from bayeslora.evaluation.predictive import move_batch

    batch = move_batch(batch, next(model.parameters()).device)
    adapted = scorer.class_logits(model, batch).float().softmax(-1)
    with model.disable_adapter():
        base = scorer.class_logits(model, batch).float().softmax(-1)
    per_sample = torch.stack([adapted, base])  # (2, B, C)
    return per_sample.mean(0), per_sample


class HalfAdaptedLora(Lora):
    """LoRA with a penalty on B, predicting with the mean of the adapted and the base model; multiple choice only."""

    name = "toy-half-adapted"
    description = "a test's toy method: LoRA with a B penalty, averaged with the base model"

    def is_stochastic(self, config) -> bool:
        return True

    def check_inputs(self, config, task):
        if task.kind != "multiple-choice":
            raise ValueError("toy-half-adapted scores multiple-choice tasks only")
        return config

    def training_extras(self, model, config, n_train) -> TrainingExtras:
        return TrainingExtras(losses=[_b_penalty])

    def predictive(self, config, n_samples, run_dir=None):
        return {"sampler": _with_and_without_adapter}


@pytest.fixture()
def toy_method():
    method = register_method(HalfAdaptedLora())
    yield method
    del METHODS[method.name]


def test_a_method_registered_outside_the_package_runs_through_the_whole_pipeline(tiny_llama_dir, tmp_path, toy_method):
    task = write_word_task(tmp_path / "words.jsonl", 8)
    heldout = write_word_task(tmp_path / "heldout.jsonl", 6)
    run = bl.train(
        model=str(tiny_llama_dir),
        task=str(task),
        eval_tasks=[str(heldout)],
        method=toy_method.name,
        rank=4,
        max_steps=6,
        batch_size=4,
        lr=1e-2,
        warmup_ratio=0.0,
        logging_steps=1,
        output_dir=str(tmp_path / "run"),
        progress=False,
    )
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert any(entry.get("b_penalty", 0) > 0 for entry in log)  # its loss term was trained with
    metrics = json.loads((run / "eval" / "heldout" / "metrics.json").read_text())
    assert metrics["method"] == toy_method.name and metrics["n_samples"] == 2  # its predictive drew 2 "samples"

    again = bl.evaluate(run, task=str(task), overwrite=True)  # evaluate anew, from the saved adapter
    assert again["n_samples"] == 2
    base, _ = bl.load_model(str(tiny_llama_dir), dtype="float32", device="cpu")
    loaded = load_adapter(base, Path(run) / "adapter")
    assert type(loaded.peft_config["default"]).__name__ == "LoraConfig"
    assert toy_method.name in run_report([run])

    classification = tmp_path / "texts.jsonl"
    classification.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    with pytest.raises(ValueError, match="multiple-choice tasks only"):  # its input check
        bl.train(
            model=str(tiny_llama_dir),
            task=str(classification),
            method=toy_method.name,
            progress=False,
            output_dir=str(tmp_path / "refused"),
        )
    assert not (tmp_path / "refused").exists()
