"""Laplace-LoRA: K-FAC curvature, predictive variance, prior precision, linearised vs sampled predictive."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from bayeslora.evaluation.scoring import ClozeScorer
from bayeslora.methods.laplace.kfac import KronLaplace, lora_linears
from bayeslora.tasks import MultipleChoiceExample


def questions(count: int, offset: int = 0):
    return [
        MultipleChoiceExample.from_question(f"Question {i} about colour?", ["blue", "red", "green"], i % 3)
        for i in range(offset, offset + count)
    ]


@pytest.fixture()
def lora(tiny_llama):
    model, tokenizer = tiny_llama
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    return peft_model.eval(), ClozeScorer(tokenizer, num_classes=3)


def total_variance(laplace, model, scorer, examples, prior=None):
    batch = scorer.collate(examples)
    _, projected = laplace.projected_gradients(model, scorer, batch)
    return laplace.covariance(projected, batch["choice_mask"], prior).diagonal(dim1=1, dim2=2)


def test_predictive_variance_is_positive_and_shrinks_with_data_and_a_tighter_prior(lora):
    model, scorer = lora
    probe = questions(3, offset=100)
    few = KronLaplace.fit(model, scorer, questions(4))
    many = KronLaplace.fit(model, scorer, questions(32))
    variance_few = total_variance(few, model, scorer, probe, prior=1.0)
    assert (variance_few > 0).all()
    assert (total_variance(many, model, scorer, probe, prior=1.0) < variance_few).all()
    assert (total_variance(few, model, scorer, probe, prior=100.0) < variance_few).all()


def test_linearised_predictive_matches_sampled_weights_near_the_mode(lora):
    model, scorer = lora
    laplace = KronLaplace.fit(model, scorer, questions(16))
    laplace.prior_precision = 2e4  # a narrow posterior: the network is close to linear over it
    batch = scorer.collate(questions(2, offset=50))
    logits, projected = laplace.projected_gradients(model, scorer, batch)
    covariance = laplace.covariance(projected, batch["choice_mask"])
    generator = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(400):
        with laplace.sampled_weights(model, generator=generator), torch.no_grad():
            draws.append(scorer.class_logits(model, batch).double())
    draws = torch.stack(draws)  # (S, B, C)
    centred = draws - draws.mean(0)
    empirical = torch.einsum("sbi,sbj->bij", centred, centred) / (draws.shape[0] - 1)
    std = covariance.diagonal(dim1=1, dim2=2).sqrt()
    assert ((draws.mean(0) - logits).abs() < 0.25 * std).all()  # Monte Carlo error of 400 draws: 0.05 std
    ratio = empirical.diagonal(dim1=1, dim2=2) / covariance.diagonal(dim1=1, dim2=2)
    assert ((ratio > 0.8) & (ratio < 1.2)).all()  # Monte Carlo error of a variance from 400 draws: ~7%
    torch.testing.assert_close(empirical, covariance, rtol=0, atol=0.2 * covariance.abs().max().item())
    linearised, _ = laplace.predict_batch(model, scorer, batch, "glm")  # the two predictives' probabilities
    torch.testing.assert_close(linearised.double(), draws.softmax(-1).mean(0), rtol=0, atol=0.02)


def test_log_marginal_likelihood_matches_a_dense_float64_reference(lora):
    """−½ λ ‖θ*‖² + (P/2) log λ − ½ log det(Ā ⊗ G + λ I) with the Kronecker products built densely and θ*
    read from the model, against the eigenvalue form the code evaluates."""
    model, scorer = lora
    laplace = KronLaplace.fit(model, scorer, questions(16))
    theta = torch.cat([m.weight.detach().double().flatten() for m in lora_linears(model, "all").values()])
    assert laplace.num_params == theta.numel()
    for prior in (0.01, 1.0, 300.0):
        log_det = 0.0
        for f in laplace.factors:
            a = f.input_vectors.double() @ torch.diag(f.input_values.double()) @ f.input_vectors.double().T
            g = torch.diag(f.output_values.double())
            if f.output_vectors is not None:
                g = f.output_vectors.double() @ g @ f.output_vectors.double().T
            precision = torch.kron(a, g) + prior * torch.eye(a.shape[0] * g.shape[0], dtype=torch.float64)
            log_det += torch.linalg.slogdet(precision)[1].item()
        expected = -0.5 * prior * theta.square().sum().item() + 0.5 * theta.numel() * math.log(prior) - 0.5 * log_det
        assert laplace.log_marginal_likelihood(prior) == pytest.approx(expected, rel=1e-5)


def test_marginal_likelihood_prior_precision_is_the_grid_maximum(lora):
    model, scorer = lora
    laplace = KronLaplace.fit(model, scorer, questions(16))
    chosen = laplace.optimize_prior_precision()
    grid = torch.logspace(-4, 6, 401).tolist()
    best = max(grid, key=laplace.log_marginal_likelihood)
    assert laplace.log_marginal_likelihood(chosen) >= laplace.log_marginal_likelihood(best) - 1e-6
    assert abs(math.log10(chosen) - math.log10(best)) < 0.05


def test_heldout_prior_selection_and_both_predictives(lora):
    model, scorer = lora
    laplace = KronLaplace.fit(model, scorer, questions(16))
    chosen = laplace.select_prior_precision_on(model, scorer, questions(6, offset=200), grid=[0.1, 10.0, 1000.0])
    assert chosen in (0.1, 10.0, 1000.0)
    batch = scorer.collate(questions(3, offset=300))
    for predictive, draws in (("glm", 4), ("nn", 4)):
        probs, per_sample = laplace.predict_batch(model, scorer, batch, predictive, n_samples=4)
        assert per_sample.shape[0] == draws
        torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_save_load_round_trip_and_subsets(lora, tmp_path):
    model, scorer = lora
    assert len(lora_linears(model, "all")) == 8 and len(lora_linears(model, "last")) == 2
    laplace = KronLaplace.fit(model, scorer, questions(8), subset="last")
    laplace.prior_precision = 3.5
    laplace.save(tmp_path / "laplace.safetensors")
    loaded = KronLaplace.load(tmp_path / "laplace.safetensors")
    assert loaded.prior_precision == 3.5 and loaded.subset == "last"
    assert loaded.log_marginal_likelihood(2.0) == pytest.approx(laplace.log_marginal_likelihood(2.0))
    (tmp_path / "broken.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable Laplace"):
        KronLaplace.load(tmp_path / "broken.safetensors")


def test_laplace_method_end_to_end(tiny_llama_dir, tmp_path):
    import json

    import bayeslora as bl
    from bayeslora.reporting.report import run_report

    rows = [{"question": f"Item {i}: which word?", "choices": ["apple", "river"], "answer": i % 2} for i in range(24)]
    task = tmp_path / "toy.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(model=str(tiny_llama_dir), task=str(task), eval_tasks=[str(task)], rank=2, max_steps=4,
                  batch_size=4, lr=1e-2, train_size=8, progress=False)  # fmt: skip
    with pytest.warns(UserWarning, match="only 16 of the 24 training examples are left unused"):
        run = bl.train(method="laplace", output_dir=str(tmp_path / "glm"), **common)  # prior 'auto'
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["laplace_prior"] == "marglik"
    assert "laplace_prior: marglik" in (run / "config.yaml").read_text()  # the rule 'auto' chose, recorded
    assert summary["laplace_prior_precision"] > 0 and summary["laplace_params"] > 0
    assert (run / "laplace.safetensors").is_file()
    metrics = json.loads((run / "eval" / "toy" / "metrics.json").read_text())
    assert metrics["method"] == "laplace" and metrics["n_samples"] == 10  # 10 of the linearised predictive's draws
    assert metrics["laplace_fit_s"] == summary["laplace_fit_s"]  # reported next to the training time
    assert "post-hoc fit s" in run_report([run]).splitlines()[4]
    mode = bl.evaluate(run, samples=0, output_dir=tmp_path / "mode", progress=False)  # the trained LoRA
    assert mode["nll"] != pytest.approx(metrics["nll"])
    run = bl.train(
        method="laplace",
        laplace_prior="heldout",
        laplace_predictive="nn",
        laplace_subset="last",
        samples=3,
        output_dir=str(tmp_path / "nn"),
        **common,
    )
    metrics = json.loads((run / "eval" / "toy" / "metrics.json").read_text())
    assert metrics["n_samples"] == 3
    assert json.loads((run / "train_summary.json").read_text())["laplace_prior"] == "heldout"
    assert (
        json.loads((run / "train_summary.json").read_text())["laplace_prior_precision"]
        in torch.logspace(-2, 6, 17).tolist()
    )


@pytest.mark.parametrize("predictive", ["glm", "nn"])
def test_posthoc_laplace_of_a_lora_run_equals_the_laplace_method(tiny_llama_dir, tmp_path, predictive):
    import json

    from safetensors.torch import load_file

    import bayeslora as bl
    from _toy_models import write_word_task

    task = write_word_task(tmp_path / "toy.jsonl", 24)
    common = dict(model=str(tiny_llama_dir), task=str(task), eval_tasks=[str(task)], rank=2, max_steps=4,
                  batch_size=4, lr=1e-2, train_size=8, progress=False)  # fmt: skip
    options = dict(laplace_predictive=predictive, **({"samples": 3} if predictive == "nn" else {}))
    lora = bl.train(method="lora", output_dir=str(tmp_path / "lora"), **common)
    posthoc = bl.laplace(lora, progress=False, **options)
    direct = bl.train(method="laplace", output_dir=str(tmp_path / "direct"), **common, **options)

    assert posthoc == tmp_path / "lora-laplace" and (lora / "eval" / "toy" / "metrics.json").is_file()
    ours, reference = load_file(str(posthoc / "laplace.safetensors")), load_file(str(direct / "laplace.safetensors"))
    assert ours.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], atol=1e-6, rtol=1e-5)
    got, expected = (json.loads((run / "eval" / "toy" / "metrics.json").read_text()) for run in (posthoc, direct))
    assert got["method"] == expected["method"] == "laplace" and got["n_samples"] == expected["n_samples"]
    for key in ("accuracy", "ece", "nll", "brier"):
        assert got[key] == pytest.approx(expected[key], abs=1e-5)
    assert bl.evaluate(posthoc, samples=0, output_dir=tmp_path / "mode", progress=False)["nll"] == pytest.approx(
        json.loads((lora / "eval" / "toy" / "metrics.json").read_text())["nll"], abs=1e-6
    )  # the posterior mode is the LoRA run


def test_posthoc_laplace_refuses_what_it_cannot_fit(tiny_llama_dir, tmp_path, capsys):
    import bayeslora as bl
    from _toy_models import write_word_task
    from bayeslora.cli import main

    task = write_word_task(tmp_path / "toy.jsonl", 12)
    common = dict(model=str(tiny_llama_dir), task=str(task), eval_tasks=[str(task)], rank=2, max_steps=1,
                  batch_size=4, train_size=8, progress=False)  # fmt: skip
    melora = bl.train(method="melora", output_dir=str(tmp_path / "melora"), **common)
    with pytest.raises(ValueError, match=r"'melora' run\. Train one with --method lora"):
        bl.laplace(melora, progress=False)
    lora = bl.train(method="lora", output_dir=str(tmp_path / "lora"), **common)
    with pytest.raises(ValueError, match="not rank"):
        bl.laplace(lora, rank=4, progress=False)
    with pytest.raises(ValueError, match="is the LoRA run the posterior is fitted to"):
        bl.laplace(lora, output_dir=tmp_path / "." / "lora", overwrite=True, progress=False)
    assert (lora / "adapter").is_dir() and not list(tmp_path.glob("lora.failed-*"))
    assert main(["--quiet", "laplace", "--run", str(lora), "--output-dir", str(tmp_path / "la")]) == 0
    assert main(["--quiet", "laplace", "--run", str(lora), "--output-dir", str(tmp_path / "la")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "la" / "laplace.safetensors").is_file()


def test_auto_prior_is_heldout_only_when_enough_examples_are_left():
    import warnings

    from bayeslora.methods.laplace.kfac import MIN_HELDOUT, resolve_prior

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_prior("auto", 2251, 320) == "heldout"
        assert resolve_prior("auto", 320 + MIN_HELDOUT, 320) == "heldout"
        assert resolve_prior("marglik", 2251, 320) == "marglik"
        assert resolve_prior("heldout", 2251, 320) == "heldout"
    with pytest.warns(UserWarning, match=f"only {MIN_HELDOUT - 1} of the"):
        assert resolve_prior("auto", 320 + MIN_HELDOUT - 1, 320) == "marglik"
    with pytest.warns(UserWarning, match="only 0 of the 2251"):
        assert resolve_prior("auto", 2251, None) == "marglik"
    with pytest.raises(ValueError, match="must be one of auto, marglik, heldout"):
        resolve_prior("evidence", 2251, 320)
    for train_size in (None, 2251):  # nothing held out
        with pytest.raises(ValueError, match="trains on all 2251: train with --train-size below 2251"):
            resolve_prior("heldout", 2251, train_size)


def test_a_heldout_prior_without_heldout_examples_is_refused_before_training(tiny_llama_dir, tmp_path):
    import bayeslora as bl
    from _toy_models import write_word_task

    task = write_word_task(tmp_path / "toy.jsonl", 12)
    with pytest.raises(ValueError, match=r"--laplace-prior heldout .* trains on all 12"):
        bl.train(model=str(tiny_llama_dir), task=str(task), method="laplace", laplace_prior="heldout", rank=2,
                 max_steps=2, output_dir=str(tmp_path / "run"), progress=False)  # fmt: skip
    assert not (tmp_path / "run").exists()
