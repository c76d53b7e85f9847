"""Paired bootstrap intervals and the calibrated-model ECE floor, against analytic references."""

from __future__ import annotations

import math

import pytest
import torch

from bayeslora.evaluation.metrics import accuracy
from bayeslora.evaluation.significance import calibrated_ece_floor, compare, paired_bootstrap


def _two_models(n: int = 400, seed: int = 0):
    """Predictions of two models on the same n two-class questions: a is right on ~70 %, b on ~55 %."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=generator)
    right_a = torch.rand(n, generator=generator) < 0.7
    right_b = torch.rand(n, generator=generator) < 0.55
    onehot = torch.nn.functional.one_hot(labels, 2).float()

    def probs(right):
        hit = torch.where(right[:, None], onehot, 1 - onehot)
        return 0.8 * hit + 0.1  # confidence 0.9 on the predicted class

    return probs(right_a), probs(right_b), labels


def test_the_difference_is_the_metrics_difference_and_the_interval_its_paired_normal_width():
    a, b, labels = _two_models()
    result = paired_bootstrap(a, b, labels, "accuracy", resamples=4000)
    assert result.difference == pytest.approx(accuracy(a, labels) - accuracy(b, labels))
    correct = lambda p: (p.argmax(1) == labels).double()  # noqa: E731
    per_question = correct(a) - correct(b)  # paired differences d_i
    half_width = 1.96 * float(per_question.std()) / math.sqrt(labels.shape[0])  # normal approximation
    assert (result.high - result.low) / 2 == pytest.approx(half_width, rel=0.1)
    assert result.low < result.difference < result.high and result.excludes_zero


def test_identical_predictions_differ_by_exactly_zero():
    a, _, labels = _two_models()
    for difference in compare(a, a.clone(), labels, resamples=200).values():
        assert difference.difference == 0 and difference.low == 0 and difference.high == 0
        assert not difference.excludes_zero


def test_the_interval_is_seeded_and_refuses_unpaired_inputs():
    a, b, labels = _two_models()
    first = paired_bootstrap(a, b, labels, "nll", resamples=300, seed=3)
    assert first == paired_bootstrap(a, b, labels, "nll", resamples=300, seed=3)
    with pytest.raises(ValueError, match="same questions"):
        paired_bootstrap(a, b[:-1], labels)
    with pytest.raises(ValueError, match="unknown metric 'auroc'"):
        paired_bootstrap(a, b, labels, "auroc")


def test_the_ece_floor_of_a_constant_predictor_matches_the_binomial_expectation():
    n = 300
    probs = torch.full((n, 2), 0.5)
    mean, std = calibrated_ece_floor(probs, draws=2000)
    # every confidence is 0.5, in one bin: ECE = |k/n − 0.5| with k ~ Binomial(n, 0.5), E ≈ sqrt(2/π)·sqrt(0.25/n)
    expected = math.sqrt(2 / math.pi) * math.sqrt(0.25 / n)
    assert mean == pytest.approx(expected, rel=0.06)
    assert std == pytest.approx(math.sqrt(0.25 / n) * math.sqrt(1 - 2 / math.pi), rel=0.1)


def test_the_seed_mean_difference_is_the_mean_of_the_seeds_differences_and_one_seed_is_the_paired_bootstrap():
    from bayeslora.evaluation.significance import paired_bootstrap_seeds

    a1, b1, labels = _two_models(seed=0)
    a2, b2, _ = _two_models(seed=0)
    a2, b2 = a2.flip(0), b2  # another "seed" of a on the same questions
    result = paired_bootstrap_seeds([a1, a2], [b1, b2], labels, "accuracy", resamples=500)
    expected = (accuracy(a1, labels) - accuracy(b1, labels) + accuracy(a2, labels) - accuracy(b2, labels)) / 2
    assert result.difference == pytest.approx(expected)
    alone = paired_bootstrap_seeds([a1], [b1], labels, "nll", resamples=300, seed=3)
    assert alone == paired_bootstrap(a1, b1, labels, "nll", resamples=300, seed=3)
