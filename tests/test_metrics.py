"""Metrics against torchmetrics, float64 references and a case computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from bayeslora.evaluation.metrics import (
    accuracy,
    brier_score,
    classification_metrics,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)


def test_hand_computed_case():
    # confidences 0.9 (right), 0.6 (wrong), 0.8 (right), 0.5 (right)
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]])
    labels = torch.tensor([0, 1, 1, 0])
    assert accuracy(probs, labels) == pytest.approx(0.75)
    # 15 bins of width 1/15: 0.9 -> bin 13, 0.6 -> bin 9, 0.8 -> bin 12, 0.5 -> bin 7; one example each,
    # so ECE = (|1-0.9| + |0-0.6| + |1-0.8| + |1-0.5|) / 4
    assert expected_calibration_error(probs, labels) == pytest.approx((0.1 + 0.6 + 0.2 + 0.5) / 4, abs=1e-6)
    expected_nll = -(math.log(0.9) + math.log(0.4) + math.log(0.8) + math.log(0.5)) / 4
    assert negative_log_likelihood(probs, labels) == pytest.approx(expected_nll, rel=1e-6)
    expected_brier = ((0.1**2 + 0.1**2) + (0.6**2 + 0.6**2) + (0.2**2 + 0.2**2) + (0.5**2 + 0.5**2)) / 4
    assert brier_score(probs, labels) == pytest.approx(expected_brier, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_torchmetrics_and_float64(seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(500, 4, generator=generator) * 3
    probs = logits.softmax(-1)
    labels = torch.randint(0, 4, (500,), generator=generator)
    reference = MulticlassCalibrationError(num_classes=4, n_bins=15, norm="l1")(probs, labels)
    assert expected_calibration_error(probs, labels) == pytest.approx(float(reference), abs=1e-6)
    nll = torch.nn.functional.cross_entropy(logits.double(), labels)
    assert negative_log_likelihood(probs, labels) == pytest.approx(float(nll), rel=1e-5)
    assert accuracy(probs, labels) == pytest.approx(float((probs.argmax(1) == labels).double().mean()))


def test_reliability_bins_imply_the_same_ece_including_certain_predictions():
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.7, 0.3], [0.2, 0.8], [0.55, 0.45]])
    labels = torch.tensor([0, 1, 0, 1, 1])
    bins = reliability_bins(probs, labels)
    assert bins.count.sum() == 5
    assert bins.count[-1] == 2  # confidence exactly 1 has its own slot, as in torchmetrics
    assert bins.ece == pytest.approx(expected_calibration_error(probs, labels), abs=1e-6)


def test_missing_choices_and_bad_input():
    # a 3-choice question padded to 4 classes: the zero column changes nothing
    probs = torch.tensor([[0.2, 0.7, 0.1, 0.0], [0.5, 0.25, 0.25, 0.0]])
    labels = torch.tensor([1, 2])
    metrics = classification_metrics(probs, labels)
    assert metrics["accuracy"] == 0.5
    assert metrics["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.25)) / 2)
    with pytest.raises(ValueError, match="labels must lie"):
        accuracy(probs, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="no predictions"):
        accuracy(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    # a probability of exactly 0 on the label gives a large finite NLL, not inf
    assert math.isfinite(negative_log_likelihood(torch.tensor([[1.0, 0.0]]), torch.tensor([1])))
