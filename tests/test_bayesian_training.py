"""The Bayesian objectives inside the Trainer, end to end on tiny models and the packaged SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch

import bayeslora as bl
from bayeslora.cli import main
from bayeslora.evaluation import load_predictions
from bayeslora.methods.variational import ElboObjective, variance_parameters


def log_lines(run):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.parametrize("method", ["melora", "blob"])
def test_elbo_training_logs_kl_and_beta_and_learns(tiny_llama_dir, toy_task, tmp_path, method):
    run = bl.train(
        model=str(tiny_llama_dir),
        task=str(toy_task),
        eval_tasks=[str(toy_task)],
        method=method,
        rank=4,
        max_steps=40,
        batch_size=4,
        lr=1e-2,
        warmup_ratio=0.0,
        logging_steps=5,
        kl_warmup=0.5,
        samples=3,
        kl_weight=0.05,  # 8 examples: the full ELBO weight would let the prior dominate
        output_dir=str(tmp_path / method),
        progress=False,
    )
    log = log_lines(run)
    assert all({"nll", "kl", "kl_term", "beta", "sigma_mean"} <= set(r) for r in log)
    assert all(r["sigma_mean"] > 0 for r in log)
    assert log[0]["beta"] < log[-1]["beta"] == pytest.approx(0.05)  # annealed over half the steps
    assert log[-1]["kl_term"] == pytest.approx(log[-1]["kl"] * log[-1]["beta"] / 8, rel=0.05)  # KL / N_train
    assert log[-1]["nll"] < 0.7 * log[0]["nll"]
    metrics = json.loads((run / "eval" / "toy" / "metrics.json").read_text())
    assert metrics["n_samples"] == 3 and metrics["method"] == method
    assert metrics["step_memory_mb"] > 0  # one training step measured by the allocator
    # the run's own peaks: training (within the process's lifetime peak at its end) and this evaluation
    assert 0 < metrics["train_peak_memory_mb"] <= metrics["peak_memory_mb"]
    assert metrics["eval_peak_memory_mb"] > 0
    saved = load_predictions(run / "eval" / "toy")  # each sample's probabilities are kept
    assert saved.sample_probs.shape == (3, 8, 2)
    torch.testing.assert_close(saved.sample_probs.mean(0), saved.probs)


def test_blob_schedule_steps_the_kl_separately(tiny_llama_dir, toy_task, tmp_path):
    run = bl.train(
        model=str(tiny_llama_dir),
        task=str(toy_task),
        eval_tasks=[],
        method="blob",
        rank=4,
        max_steps=6,
        batch_size=4,
        lr=1e-3,
        logging_steps=2,
        kl_schedule="blob",
        output_dir=str(tmp_path / "b"),
        progress=False,
    )
    log = log_lines(run)
    assert all("pi" in r and "kl" in r for r in log) and "kl_term" not in log[-1]
    assert all(0 < r["pi"] < 1 for r in log)


def test_sigma_lr_gets_its_own_parameter_group(tiny_llama, toy_task, tmp_path):
    model, tokenizer = tiny_llama
    task = bl.load_task(str(toy_task))
    config = bl.make_config(model="x", task=str(toy_task), method="melora", rank=4, sigma_lr=0.05, lr=1e-3)
    model, _ = bl.attach_adapter(model, config, task)
    from bayeslora.training import BayesLoraTrainer, ExampleDataset, training_arguments

    variance = variance_parameters(model)
    assert len(variance) == 5  # q_proj and v_proj in 2 layers, and lm_head
    trainer = BayesLoraTrainer(
        model=model,
        args=training_arguments(config, tmp_path / "ckpt", progress=False),
        train_dataset=ExampleDataset(task.train),
        data_collator=bl.build_scorer(task, tokenizer, config).collate,
        scorer=bl.build_scorer(task, tokenizer, config),
        special_lrs=[(variance, 0.05)],
    )
    optimizer = trainer.create_optimizer()
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert all(groups[id(p)]["lr"] == 0.05 and groups[id(p)]["weight_decay"] == 0.0 for p in variance)
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in {id(v) for v in variance}]
    assert others and all(groups[id(p)]["lr"] == 1e-3 for p in others)


def test_elbo_beta_schedule():
    objective = ElboObjective(n_train=100, kl_weight=0.5, kl_warmup=0.2)
    assert objective.beta(0, 100) == pytest.approx(0.5 / 20)
    assert objective.beta(19, 100) == pytest.approx(0.5)
    assert objective.beta(80, 100) == 0.5
    assert ElboObjective(100, 1.0, 0.0).beta(0, 100) == 1.0


def test_cli_melora_on_packaged_smollm2_with_mean_and_sampled_eval(tmp_path, capsys):
    out = tmp_path / "melora"
    code = main(
        [
            "--quiet",
            "train",
            "--task",
            "arc-easy",
            "--method",
            "melora",
            "--rank",
            "4",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--train-size",
            "8",
            "--limit",
            "6",
            "--samples",
            "3",
            "--num-layers",
            "2",
            "--sigma-lr",
            "0.01",
            "--output-dir",
            str(out),
        ]
    )
    assert code == 0
    sampled = json.loads((out / "eval" / "arc-easy" / "metrics.json").read_text())
    assert sampled["n_samples"] == 3
    assert main(["--quiet", "eval", "--run", str(out), "--samples", "0", "--output-dir", str(tmp_path / "mean")]) == 0
    mean = json.loads((tmp_path / "mean" / "eval" / "arc-easy" / "metrics.json").read_text())
    assert mean["n_samples"] == 0 and mean["nll"] != sampled["nll"]
    # the same seed gives the same sampled evaluation
    assert main(["--quiet", "eval", "--run", str(out), "--output-dir", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "eval" / "arc-easy" / "metrics.json").read_text())
    assert again["nll"] == pytest.approx(sampled["nll"], abs=1e-6)


def test_blob_cycle_length_counts_every_process(monkeypatch):
    from bayeslora.methods import variational

    config = bl.RunConfig(method="blob", kl_schedule="blob", batch_size=4, grad_accum=2)
    monkeypatch.setattr(variational, "world", lambda: (0, 1))
    (one,) = variational.bayesian_objective(config, 320)[1]
    monkeypatch.setattr(variational, "world", lambda: (0, 4))
    (four,) = variational.bayesian_objective(config, 320)[1]
    assert one.cycle == variational.blob_cycle_length(320, 8) and four.cycle == variational.blob_cycle_length(320, 32)
    assert four.cycle < one.cycle
