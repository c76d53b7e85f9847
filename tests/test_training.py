"""Training through the Trainer on tiny models: it learns, it is seeded, it stops on a non-finite loss."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import bayeslora as bl
from bayeslora.training import BayesLoraTrainer, ExampleDataset, LossTerms, NonFiniteLossError, training_arguments


def train_toy(model_dir, task, out, **options):
    settings = dict(
        model=str(model_dir),
        task=str(task),
        eval_tasks=[str(task)],
        rank=4,
        max_steps=40,
        batch_size=4,
        lr=1e-2,
        warmup_ratio=0.0,
        logging_steps=5,
        output_dir=str(out),
    )
    settings.update(options)
    return bl.train(progress=False, **settings)


def test_lora_memorises_a_toy_task(tiny_llama_dir, toy_task, tmp_path):
    run = train_toy(tiny_llama_dir, toy_task, tmp_path / "run")
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    metrics = json.loads((run / "eval" / "toy" / "metrics.json").read_text())
    assert metrics["accuracy"] == 1.0


def test_same_seed_same_adapter_other_seed_differs(tiny_llama_dir, toy_task, tmp_path):
    weights = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run = train_toy(tiny_llama_dir, toy_task, tmp_path / name, seed=seed, max_steps=3, eval_tasks=[])
        weights.append(load_file(str(run / "adapter" / "adapter_model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_non_finite_loss_stops_with_the_step_and_term(tiny_llama, toy_task, tmp_path):
    model, tokenizer = tiny_llama
    task = bl.load_task(str(toy_task))
    config = bl.make_config(model="x", task=str(toy_task), max_steps=5, batch_size=4, report_to=["none"])
    model, _ = bl.attach_adapter(model, config, task)
    scorer = bl.build_scorer(task, tokenizer, config)

    def broken_prior(model, trainer):
        value = torch.tensor(float("nan")) if trainer.state.global_step >= 2 else torch.tensor(0.0)
        return LossTerms(terms={"kl": value})

    trainer = BayesLoraTrainer(
        model=model,
        args=training_arguments(config, tmp_path / "ckpt", progress=False),
        train_dataset=ExampleDataset(task.train),
        data_collator=scorer.collate,
        scorer=scorer,
        extra_loss=broken_prior,
    )
    with pytest.raises(NonFiniteLossError, match=r"at step 2 \(non-finite term\(s\): kl\)"):
        trainer.train()
