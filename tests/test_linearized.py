"""The linearised predictive of a variational adapter (bayeslora.evaluation.linearized)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import get_peft_model
from torch import nn

import bayeslora  # noqa: F401  (registers the tuners)
from _toy_models import train_toy
from bayeslora.evaluation.linearized import gaussian_softmax, linearized_predict_batch, linearized_scores
from bayeslora.evaluation.predictive import posterior_copies, predict_batch
from bayeslora.evaluation.scoring import Scorer
from bayeslora.tuners import BlobConfig, BlobLayer, MeLoraConfig, MeLoraLayer
from bayeslora.tuners.sampling import rows_of_examples
from test_shared_trunk import adapted, cloze_batch


class HeadScorer(Scorer):
    """Class scores = the model's output on a (B, n) feature batch: linear in the adapter's noise."""

    name = "head"

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def collate(self, examples):
        raise NotImplementedError

    def class_logits(self, model, batch):
        with rows_of_examples(torch.arange(batch["x"].shape[0])):
            return model(batch["x"])


class Head(nn.Module):
    def __init__(self, n: int, classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(n, classes)

    def forward(self, x):
        return self.head(x)


def linear_head(method: str, core: str = "full"):
    """A linear classifier (16 features, 4 classes) with ``method`` at r = 3 on it, every adapter parameter random."""
    torch.manual_seed(0)
    config = (
        MeLoraConfig(r=3, lora_alpha=6, target_modules=["head"], core=core)
        if method == "melora"
        else BlobConfig(r=3, lora_alpha=6, target_modules=["head"])
    )
    model = get_peft_model(Head(16, 4), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.5 + (0.5 if "rho" in name or "_g" in name else 0.0))
    return model.eval()


@pytest.mark.parametrize("method,core", [("melora", "full"), ("melora", "diag"), ("blob", "full")])
def test_the_covariance_of_a_linear_head_is_the_exact_one(method, core):
    """Scores linear in the noise: J Jᵀ must be their exact covariance, computed here in float64 from the weights.
    Me-LoRA: f_c = (W0 x)_c + s Σ_ij B_ci S_ij (A x)_j, S_ij = M_ij + σ_ij ε_ij -> Cov_cc' = s² Σ_ij B_ci B_c'i σ_ij²
    (A x)_j². BLoB: A = M + σ ⊙ ε -> Cov_cc' = s² Σ_ij B_ci B_c'i σ_ij² x_j²."""
    model = linear_head(method, core)
    layer = next(m for m in model.modules() if isinstance(m, MeLoraLayer | BlobLayer))
    x = torch.randn(5, 16)
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[1, 3] = False  # a missing choice
    batch = {"x": x, "choice_mask": mask, "labels": torch.zeros(5, dtype=torch.long)}
    scores, covariance = linearized_scores(model, HeadScorer(4), batch)

    s = layer.scaling["default"]
    sigma = layer.posterior_std("default").double()
    if method == "melora":
        B, A = layer.melora_B["default"].double(), layer.melora_A["default"].double()
        sigma = sigma if core == "full" else torch.diag(sigma)  # a diagonal core: only S_ii vary
        inputs = x.double() @ A.T  # (E, r): what S multiplies
    else:
        B, inputs = layer.blob_B["default"].double(), x.double()  # A's noise multiplies x
    expected = s**2 * torch.einsum("ci,di,ij,ej->ecd", B, B, sigma**2, inputs**2)  # (E, C, C)
    expected = expected * (mask[:, :, None] & mask[:, None, :])
    torch.testing.assert_close(covariance, expected, rtol=1e-5, atol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(scores.float(), model(x), rtol=1e-5, atol=1e-6)  # the posterior mean's scores
    # and the model is as it was: nothing left requiring grad or sampling
    assert all(p.requires_grad for n, p in model.named_parameters() if "default" in n)


def narrow(model, sigma: float):
    """``model`` with every core entry's σ set to ``sigma`` (softplus parametrisation)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "melora_core_rho" in name:
                p.fill_(math.log(math.expm1(sigma)))
    return model


@pytest.mark.parametrize("spec", ["last:0", "all"])
def test_the_linearised_covariance_matches_sampled_class_scores_when_the_posterior_is_narrow(spec, smol_tokenizer):
    """Cloze scores through the softmax of the LM head (last:0) or through every block (all) are not linear in the
    noise, but with a narrow posterior the sampled scores' mean and covariance approach f(μ) and J Jᵀ."""
    model = narrow(adapted("melora", spec, vocab=len(smol_tokenizer)), 0.02)  # the scores' std ~0.5
    scorer, batch = cloze_batch(smol_tokenizer)
    scores, covariance = linearized_scores(model, scorer, batch)
    assert covariance.diagonal(dim1=1, dim2=2).min() > 0
    n = 2000
    torch.manual_seed(0)
    with torch.no_grad(), posterior_copies(model, n, 3):
        sampled = scorer.class_logits(model, scorer.repeat(batch, n)).double().view(n, 3, 3)  # (S, B, C)
    centred = sampled - sampled.mean(0)
    empirical = torch.einsum("sbc,sbd->bcd", centred, centred) / (n - 1)
    std = covariance.diagonal(dim1=1, dim2=2).sqrt()
    assert 0.05 < std.max() < 5
    torch.testing.assert_close(sampled.mean(0), scores, rtol=0, atol=0.1 * float(std.max()))
    torch.testing.assert_close(empirical, covariance, rtol=0.15, atol=0.1 * float(covariance.abs().max()))


def test_the_probit_and_monte_carlo_links_against_their_definitions():
    torch.manual_seed(0)
    mean = torch.tensor([[1.0, -0.5, 0.2], [0.3, 2.0, float("-inf")]], dtype=torch.float64)
    factor = torch.randn(2, 3, 3, dtype=torch.float64)
    covariance = factor @ factor.transpose(1, 2)
    covariance[1, 2, :] = covariance[1, :, 2] = 0  # the missing choice has no variance
    probit = gaussian_softmax(mean, covariance, "probit")
    for b, choices in ((0, 3), (1, 2)):  # softmax(m'/√(1 + π/8 diag V')) on the scores centred over the choices
        centre = torch.eye(choices, dtype=torch.float64) - 1 / choices
        m, v = centre @ mean[b, :choices], centre @ covariance[b, :choices, :choices] @ centre
        expected = (m / torch.sqrt(1 + math.pi / 8 * v.diagonal())).softmax(-1)
        torch.testing.assert_close(probit[b, :choices], expected)
    # glm: the mean softmax under torch.distributions' Gaussian (many draws on both sides: Monte Carlo error ~0.005)
    glm = gaussian_softmax(mean, covariance, "glm", draws=200_000, generator=torch.Generator().manual_seed(1))
    first = torch.distributions.MultivariateNormal(mean[0], covariance[0]).sample((200_000,)).softmax(-1).mean(0)
    second = torch.distributions.MultivariateNormal(mean[1, :2], covariance[1, :2, :2]).sample((200_000,))
    torch.testing.assert_close(glm[0], first, rtol=0, atol=0.01)
    torch.testing.assert_close(glm[1, :2], second.softmax(-1).mean(0), rtol=0, atol=0.01)
    assert glm[1, 2] == 0 and probit[1, 2] == 0
    # no variance: both are the softmax of the mean
    for link in ("glm", "probit"):
        torch.testing.assert_close(
            gaussian_softmax(mean, torch.zeros_like(covariance), link), mean.softmax(-1), rtol=0, atol=1e-6
        )
    # the softmax ignores a shift common to all scores, and so must the links: add one to the mean and its variance
    shifted_cov = covariance.clone()
    shifted_cov[0] += 4.0  # a shift of variance 4 common to example 0's three scores
    shifted_cov[1, :2, :2] += 4.0  # and to example 1's two valid ones
    shifted = mean + 3.0
    torch.testing.assert_close(gaussian_softmax(shifted, shifted_cov, "probit"), probit)
    with pytest.raises(ValueError, match="glm, probit"):
        gaussian_softmax(mean, covariance, "bridge")


def test_the_linearised_predictive_of_a_head_only_posterior_agrees_with_many_samples(smol_tokenizer):
    """On the realistic path (cloze scoring, posterior in the LM head), the linearised predictive's probabilities
    are close to those of 1,000 posterior samples when the posterior is narrow, and keep the requested number of
    single draws."""
    model = narrow(adapted("melora", "last:0", vocab=len(smol_tokenizer)), 0.1)
    scorer, batch = cloze_batch(smol_tokenizer)
    torch.manual_seed(0)
    sampled, _ = predict_batch(model, scorer, batch, n_samples=1000)
    assert (sampled - predict_batch(model, scorer, batch, n_samples=0)[0]).abs().max() > 0.02  # the spread matters
    for link in ("glm", "probit"):
        probs, draws = linearized_predict_batch(model, scorer, batch, link=link, n_samples=7)
        assert draws.shape == (7, 3, 3)
        torch.testing.assert_close(probs.sum(-1), torch.ones(3))
        assert (probs - sampled).abs().max() < {"glm": 0.02, "probit": 0.03}[link], (link, probs, sampled)


def test_a_model_without_a_posterior_is_refused(smol_tokenizer):
    model = adapted("melora", "last:0", vocab=len(smol_tokenizer))
    layer = next(m for m in model.modules() if isinstance(m, MeLoraLayer) and m.stochastic["default"])
    layer.stochastic["default"] = False
    scorer, batch = cloze_batch(smol_tokenizer)
    with pytest.raises(ValueError, match="--posterior-predictive samples"):
        linearized_scores(model, scorer, batch)


def test_a_run_evaluates_with_the_linearised_predictive_and_records_it(tiny_llama_dir, toy_task, tmp_path):
    import bayeslora as bl

    run = train_toy(tiny_llama_dir, toy_task, tmp_path / "run", method="melora", bayesian_layers="last:0", samples=3)
    sampled = json.loads((run / "eval" / "toy" / "metrics.json").read_text())
    linear = bl.evaluate(run, posterior_predictive="probit", output_dir=tmp_path / "eval", progress=False)
    assert linear["posterior_predictive"] == "probit" and sampled["posterior_predictive"] == "samples"
    assert abs(linear["accuracy"] - sampled["accuracy"]) <= 0.25
    assert math.isfinite(linear["nll"]) and linear["nll"] == pytest.approx(sampled["nll"], rel=0.2)


def test_the_benchmark_compares_every_predictive_with_many_samples(tiny_llama_dir, toy_task, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from linearized import PREDICTIVES, REFERENCE, markdown, measure_run

    run = train_toy(tiny_llama_dir, toy_task, tmp_path / "run", method="melora", bayesian_layers="last:0", samples=3)
    result = measure_run(run, limit=8, rounds=1, batch_size=4, ood=None)
    rows = {row["predictive"]: row for row in result["rows"]}
    assert list(rows) == list(PREDICTIVES) and result["n_questions"] == 8
    assert rows[REFERENCE]["mean_abs_diff"] == 0 and rows[REFERENCE]["same_class"] == 1
    assert rows[REFERENCE]["vs_reference"]["nll"]["difference"] == 0
    assert all(len(row["probs"]) == 8 and row["time_vs_one_pass"] > 0 for row in rows.values())
    assert rows["mean"]["time_vs_one_pass"] == 1
    assert "| probit |" in markdown([result])
