"""Uncertainty away from the training distribution and selective prediction: per-example entropies, the AUROC of
telling in-distribution from out-of-distribution examples, and the risk-coverage curve.

For predictive probabilities averaged over S posterior samples, p̄ = (1/S) Σ_s p_s (per example, over C classes):

* total uncertainty, the predictive entropy H[p̄] = −Σ_c p̄_c log p̄_c;
* aleatoric, the expected entropy E_s H[p_s] (the noise every sample sees);
* epistemic, the mutual information I = H[p̄] − E_s H[p_s] ≥ 0 (how much the samples disagree; 0 for a
  deterministic model).

A deployed model that knows when it does not know gives its out-of-distribution inputs higher uncertainty: the
AUROC of that score separating out-of-distribution (positive) from in-distribution (negative) examples measures it
(0.5: no separation). Selective prediction answers only the examples it is most confident of: at coverage c, the
accuracy of the most confident fraction c; the area under the risk-coverage curve (AURC, risk = error rate) sums
it over every coverage (lower is better).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc

#: Coverages at which an evaluation reports the accuracy of its most confident examples.
COVERAGES = (0.5, 0.8)


def _entropy(probs: Tensor) -> Tensor:
    """−Σ p log p over the last dimension, in nats (0·log 0 = 0), float64."""
    probs = probs.double()
    return -(probs * probs.clamp_min(1e-300).log()).sum(-1)


def uncertainty(probs: Tensor, sample_probs: Tensor | None = None) -> dict[str, Tensor]:
    """Per example: ``entropy`` H[p̄], ``expected_entropy`` E_s H[p_s] and ``mutual_information`` (N,), from the
    averaged probabilities (N, C) and, when kept, the per-sample ones (S, N, C); without samples (a deterministic
    model) the expected entropy is the entropy and the mutual information 0."""
    total = _entropy(probs)
    expected = total.clone() if sample_probs is None else _entropy(sample_probs).mean(0)
    return {"entropy": total, "expected_entropy": expected, "mutual_information": (total - expected).clamp_min(0)}


def example_records(
    probs: Tensor,
    sample_probs: Tensor | None = None,
    *,
    ids: Sequence[object] | None = None,
    labels: Tensor | None = None,
) -> list[dict[str, object]]:
    """One JSON-ready record per example: ``id`` (default its index), the class ``probs`` (N, C), ``prediction``
    (the arg max), ``confidence`` (its probability), ``entropy``, ``expected_entropy`` (aleatoric) and
    ``mutual_information`` (epistemic; see :func:`uncertainty`); with ``labels`` also ``label`` and ``correct``."""
    spread = uncertainty(probs, sample_probs)
    confidence, predicted = probs.max(-1)
    ids = list(range(len(probs))) if ids is None else list(ids)
    if len(ids) != len(probs):
        raise ValueError(f"{len(ids)} ids for {len(probs)} examples")
    records = []
    for i, example_id in enumerate(ids):
        record: dict[str, object] = {
            "id": example_id,
            "probs": [round(float(p), 6) for p in probs[i]],
            "prediction": int(predicted[i]),
            "confidence": float(confidence[i]),
            **{name: float(values[i]) for name, values in spread.items()},
        }
        if labels is not None:
            record.update(label=int(labels[i]), correct=bool(predicted[i] == labels[i]))
        records.append(record)
    return records


def ood_auroc(in_scores: Tensor, out_scores: Tensor) -> float:
    """The AUROC of ``scores`` (higher = more likely out of distribution) separating the out-of-distribution
    examples (positives) from the in-distribution ones; 0.5 when the scores cannot tell them apart."""
    scores = torch.cat([in_scores, out_scores]).double()
    labels = torch.cat([torch.zeros(len(in_scores)), torch.ones(len(out_scores))]).long()
    if float(scores.max() - scores.min()) == 0.0:  # constant scores (a deterministic model's mutual information)
        return 0.5
    return float(binary_auroc(scores, labels))


def risk_coverage(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(coverage, accuracy)``, each (N,): answering only the k most confident examples (top-1 probability,
    ties broken by example order), coverage k/N and the accuracy of those k, for k = 1..N."""
    confidence, predicted = probs.max(-1)
    order = torch.sort(confidence, descending=True, stable=True).indices
    correct = (predicted == labels)[order].double()
    k = torch.arange(1, len(labels) + 1, dtype=torch.float64)
    return k / len(labels), correct.cumsum(0) / k


def selective_prediction(probs: Tensor, labels: Tensor) -> dict[str, object]:
    """``aurc`` (the mean error rate of the k most confident examples over k = 1..N, lower is better) and
    ``accuracy_at_coverage`` ({"0.5": ..., "0.8": ...}: the accuracy of the most confident half, 80 %)."""
    _, accuracy = risk_coverage(probs, labels)
    at = {}
    for c in COVERAGES:
        k = max(1, round(c * len(labels)))
        at[str(c)] = float(accuracy[k - 1])
    return {"aurc": float((1 - accuracy).mean()), "accuracy_at_coverage": at}
