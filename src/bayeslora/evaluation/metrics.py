"""Accuracy, calibration error, NLL and Brier score of predictive class probabilities.

Conventions of the Bayesian-LoRA literature (BLoB, Laplace-LoRA): all metrics are computed on the
sample-averaged probabilities ``p̄(y|x) = (1/N) Σ_s softmax(logits_s)``; ECE uses 15 equal-width bins,
the L1 norm and the top-1 confidence (torchmetrics ``CalibrationError``). Accuracy and ECE are returned
as fractions in [0, 1] (multiply by 100 for the papers' percentages); NLL is in nats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error

ECE_BINS = 15
_TINY = torch.finfo(torch.float64).tiny


def _validate(probs: Tensor, labels: Tensor) -> None:
    if probs.dim() != 2 or labels.dim() != 1 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"expected probs (N, C) and labels (N,), got {tuple(probs.shape)} and {tuple(labels.shape)}")
    if probs.shape[0] == 0:
        raise ValueError("no predictions to score")
    if (labels < 0).any() or (labels >= probs.shape[1]).any():
        raise ValueError(f"labels must lie in 0..{probs.shape[1] - 1}")


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Fraction of examples whose most probable class is the label."""
    _validate(probs, labels)
    return float(multiclass_accuracy(probs, labels, num_classes=probs.shape[1], average="micro"))


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = ECE_BINS) -> float:
    """ECE = Σ_bins (|B|/N)·|acc(B) − conf(B)| over equal-width bins of the top-1 confidence (L1 norm)."""
    _validate(probs, labels)
    return float(
        multiclass_calibration_error(probs.float(), labels, num_classes=probs.shape[1], n_bins=n_bins, norm="l1")
    )


def negative_log_likelihood(probs: Tensor, labels: Tensor) -> float:
    """NLL = −(1/N) Σ_i log p̄(y_i | x_i), in nats (probabilities floored at the smallest float64)."""
    _validate(probs, labels)
    picked = probs.double().gather(1, labels[:, None]).squeeze(1)
    return float(-picked.clamp_min(_TINY).log().mean())


def brier_score(probs: Tensor, labels: Tensor) -> float:
    """Multi-class Brier score (1/N) Σ_i Σ_c (p̄_ic − 1[y_i = c])², in [0, 2]."""
    _validate(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return float(((probs.double() - onehot) ** 2).sum(1).mean())


def classification_metrics(probs: Tensor, labels: Tensor) -> dict[str, float]:
    """``accuracy``, ``ece``, ``nll`` and ``brier`` of predictive probabilities ``probs`` (N, C)."""
    return {
        "accuracy": accuracy(probs, labels),
        "ece": expected_calibration_error(probs, labels),
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
    }


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics of a reliability diagram, binned exactly as torchmetrics bins for the ECE.

    Bin ``i < n_bins`` holds top-1 confidences in ``[e_i, e_{i+1})``; a final slot holds confidences of
    exactly 1.0. All tensors have ``n_bins + 1`` entries (empty bins have confidence and accuracy 0).
    """

    edges: Tensor  # (n_bins + 1,)
    confidence: Tensor  # (n_bins + 1,) mean confidence in each bin
    accuracy: Tensor  # (n_bins + 1,) fraction correct in each bin
    count: Tensor  # (n_bins + 1,) number of examples in each bin

    @property
    def ece(self) -> float:
        """The ECE these bins imply; equals :func:`expected_calibration_error`."""
        weights = self.count / self.count.sum()
        return float((weights * (self.accuracy - self.confidence).abs()).sum())


def reliability_bins(probs: Tensor, labels: Tensor, n_bins: int = ECE_BINS) -> ReliabilityBins:
    """Bin examples by their top-1 confidence (see :class:`ReliabilityBins`)."""
    _validate(probs, labels)
    confidence, predicted = probs.double().max(1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    index = torch.bucketize(confidence, edges, right=True) - 1  # (N,) in 0..n_bins
    slots = n_bins + 1
    count = torch.zeros(slots, dtype=torch.float64).scatter_add_(0, index, torch.ones_like(confidence))
    conf_sum = torch.zeros(slots, dtype=torch.float64).scatter_add_(0, index, confidence)
    acc_sum = torch.zeros(slots, dtype=torch.float64).scatter_add_(0, index, correct)
    safe = count.clamp_min(1)
    return ReliabilityBins(edges, conf_sum / safe, acc_sum / safe, count)
