"""Is a difference between two evaluations real? Paired bootstrap intervals, and the ECE a perfectly calibrated
model shows at the same size.

Both evaluations must hold predictions for the same questions (``probs`` (N, C) over the same labels (N,)).
A paired bootstrap resamples the N questions with replacement B times and recomputes the difference of a
metric on each resample, keeping the pairing (question i of resample b is scored by both models): the 2.5 %
and 97.5 % quantiles of those differences form the 95 % percentile interval. A difference is a win only where
that interval excludes zero.

ECE has a positive floor from sampling alone: a perfectly calibrated model's ECE at N questions is the ECE of
its confidences against labels drawn from its own predictive. :func:`calibrated_ece_floor` simulates it (mean
and standard deviation over draws); at 300 questions it is about 6.5 points, so an ECE near that floor cannot
be told from perfect calibration.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .metrics import accuracy, brier_score, expected_calibration_error, negative_log_likelihood

#: The metrics a comparison reports, by the name ``metrics.json`` gives them.
METRICS: dict[str, Callable[[Tensor, Tensor], float]] = {
    "accuracy": accuracy,
    "ece": expected_calibration_error,
    "nll": negative_log_likelihood,
    "brier": brier_score,
}


@dataclass(frozen=True)
class PairedDifference:
    """``metric(a) − metric(b)`` on the same questions, with its 95 % paired-bootstrap percentile interval."""

    metric: str
    difference: float
    low: float
    high: float
    n_examples: int
    resamples: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of zero (a real difference at the 95 % level)."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float | int | str | bool]:
        return {**asdict(self), "excludes_zero": self.excludes_zero}


def _check_pair(probs_a: Tensor, probs_b: Tensor, labels: Tensor) -> None:
    if probs_a.shape != probs_b.shape or probs_a.shape[0] != labels.shape[0]:
        raise ValueError(
            f"a paired comparison needs predictions of the same questions: got {tuple(probs_a.shape)}, "
            f"{tuple(probs_b.shape)} and labels {tuple(labels.shape)}"
        )


def paired_bootstrap(
    probs_a: Tensor,
    probs_b: Tensor,
    labels: Tensor,
    metric: str = "accuracy",
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedDifference:
    """``metric(probs_a) − metric(probs_b)`` over the same questions and its ``level`` percentile interval from
    ``resamples`` paired bootstrap resamples of the questions (seeded: the same inputs give the same interval)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric '{metric}': {', '.join(METRICS)}")
    _check_pair(probs_a, probs_b, labels)
    score = METRICS[metric]
    n = labels.shape[0]
    generator = torch.Generator().manual_seed(seed)
    differences = torch.empty(resamples, dtype=torch.float64)
    for b in range(resamples):
        index = torch.randint(0, n, (n,), generator=generator)  # (N,) questions drawn with replacement
        differences[b] = score(probs_a[index], labels[index]) - score(probs_b[index], labels[index])
    tail = (1 - level) / 2
    low, high = torch.quantile(differences, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return PairedDifference(metric, score(probs_a, labels) - score(probs_b, labels), low, high, n, resamples)


def paired_bootstrap_seeds(
    probs_a: Sequence[Tensor],
    probs_b: Sequence[Tensor],
    labels: Tensor,
    metric: str = "accuracy",
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedDifference:
    """The seed mean of ``metric(a_s) − metric(b_s)`` over runs s = 1..S (``probs_a[s]``, ``probs_b[s]``: runs of
    seed s, each (N, C), on the same N questions) and its ``level`` interval from resampling the questions: every
    resample draws one set of question indices and uses it for all seeds, so the interval covers the questions'
    sampling with the seeds' pairing kept (the spread between seeds is what the seeds show)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric '{metric}': {', '.join(METRICS)}")
    if len(probs_a) != len(probs_b) or not probs_a:
        raise ValueError("give the runs of a and b seed by seed (the same number of each, at least one)")
    for a, b in zip(probs_a, probs_b, strict=True):
        _check_pair(a, b, labels)
    score = METRICS[metric]
    n = labels.shape[0]

    def difference(index: Tensor | None) -> float:
        pick = (lambda t: t) if index is None else (lambda t: t[index])
        return sum(
            score(pick(a), pick(labels)) - score(pick(b), pick(labels)) for a, b in zip(probs_a, probs_b, strict=True)
        ) / len(probs_a)

    generator = torch.Generator().manual_seed(seed)
    differences = torch.tensor(
        [difference(torch.randint(0, n, (n,), generator=generator)) for _ in range(resamples)], dtype=torch.float64
    )
    tail = (1 - level) / 2
    low, high = torch.quantile(differences, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return PairedDifference(metric, difference(None), low, high, n, resamples)


def compare(probs_a: Tensor, probs_b: Tensor, labels: Tensor, **options) -> dict[str, PairedDifference]:
    """:func:`paired_bootstrap` of every metric in :data:`METRICS` (accuracy, ECE, NLL, Brier)."""
    return {name: paired_bootstrap(probs_a, probs_b, labels, name, **options) for name in METRICS}


def calibrated_ece_floor(probs: Tensor, *, draws: int = 1000, seed: int = 0) -> tuple[float, float]:
    """``(mean, std)`` of the ECE that a perfectly calibrated model with these predictive probabilities (N, C)
    shows on N questions: labels are drawn from ``probs`` itself ``draws`` times, and each draw's ECE
    (15 bins, as :func:`~bayeslora.metrics.expected_calibration_error`) is computed against them."""
    generator = torch.Generator().manual_seed(seed)
    probs = probs.double()
    values = [
        expected_calibration_error(probs, torch.multinomial(probs, 1, generator=generator).squeeze(1))
        for _ in range(draws)
    ]
    spread = torch.tensor(values, dtype=torch.float64)
    return float(spread.mean()), float(spread.std())
