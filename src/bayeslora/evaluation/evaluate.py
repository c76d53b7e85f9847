"""Evaluation: predictive probabilities on a task's evaluation split, metrics, and the files they go to.

``eval/<task>/`` of a run holds ``metrics.json`` (accuracy, ECE, NLL, Brier and what produced them),
``reliability.png``, ``predictions.safetensors`` (sample-averaged probabilities and labels, and for
N > 1 posterior samples each sample's probabilities; for reports and post-hoc calibration) and
``predictions.jsonl`` (per example, in the evaluated order: probabilities, prediction, confidence, predictive
entropy, expected entropy, mutual information, label).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..io import atomic_path, write_json_atomic, write_text_atomic
from ..system import ResidentPeak
from ..tasks import DATA_SEED, Task, seeded_subset
from .metrics import classification_metrics
from .predictive import Prediction, predict
from .reliability import save_reliability_diagram
from .scoring import Scorer
from .uncertainty import example_records, ood_auroc, selective_prediction, uncertainty

METRICS_FILE = "metrics.json"
RELIABILITY_FILE = "reliability.png"
PREDICTIONS_FILE = "predictions.safetensors"
#: Per example, readable: its probabilities, prediction, confidence, uncertainties and label (JSON lines).
EXAMPLES_FILE = "predictions.jsonl"


def eval_examples(task: Task, limit: int | None = None) -> list:
    """The evaluation examples of ``task``, or a fixed seeded subsample of ``limit`` of them."""
    return seeded_subset(task.split("eval"), limit, DATA_SEED)


def evaluate_model(
    model: nn.Module,
    scorer: Scorer,
    examples: list,
    *,
    n_samples: int = 1,
    batch_size: int = 16,
    progress: bool = True,
    **options: Any,
) -> tuple[dict[str, Any], Prediction]:
    """Metrics of ``model`` on ``examples``: accuracy, ece, nll, brier; selective prediction (aurc,
    accuracy_at_coverage) and the mean predictive entropy and mutual information (see
    :mod:`bayeslora.evaluation.uncertainty`); n_examples, n_samples, eval_time_s, eval_peak_memory_mb (this
    evaluation's peak resident set; the process's lifetime peak where that cannot be reset). With several samples
    (or ensemble members) the prediction keeps each one's probabilities. ``options``: MC dropout or ensemble
    members, see :func:`bayeslora.evaluation.predictive.predict`."""
    start = time.perf_counter()
    with ResidentPeak(next(model.parameters()).device) as evaluation_peak:
        prediction = predict(
            model,
            scorer,
            examples,
            n_samples=n_samples,
            batch_size=batch_size,
            keep_samples=n_samples > 1 or bool(options.get("members")) or options.get("sampler") is not None,
            progress=progress,
            **options,
        )
    elapsed = time.perf_counter() - start
    if prediction.sample_probs is not None:
        n_samples = prediction.sample_probs.shape[0]  # ensemble members, or a custom predictive's draws
        if n_samples == 1:  # a single predictive (Laplace's linearised one): nothing beyond probs to keep
            prediction.sample_probs = None
    metrics: dict[str, Any] = classification_metrics(prediction.probs, prediction.labels)
    metrics.update(selective_prediction(prediction.probs, prediction.labels))
    spread = uncertainty(prediction.probs, prediction.sample_probs)
    metrics.update(
        mean_entropy=float(spread["entropy"].mean()), mean_mutual_information=float(spread["mutual_information"].mean())
    )
    metrics.update(n_examples=len(examples), n_samples=n_samples, eval_time_s=round(elapsed, 2))
    metrics.update(eval_peak_memory_mb=round(evaluation_peak.peak_mib, 1))
    return metrics, prediction


def write_evaluation(out_dir: str | Path, metrics: dict[str, Any], prediction: Prediction, title: str) -> None:
    """Write metrics.json, reliability.png, predictions.safetensors and predictions.jsonl (per example: see
    :func:`~bayeslora.evaluation.uncertainty.example_records`) into ``out_dir`` (each atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / PREDICTIONS_FILE) as tmp:
        tensors = {"probs": prediction.probs.contiguous(), "labels": prediction.labels.contiguous()}
        if prediction.sample_probs is not None:
            tensors["sample_probs"] = prediction.sample_probs.contiguous()  # (n_samples, N, C)
        save_file(
            tensors,
            str(tmp),
            metadata={"task": str(metrics.get("task")), "method": str(metrics.get("method"))},
        )
    records = example_records(prediction.probs, prediction.sample_probs, labels=prediction.labels)
    write_text_atomic(out_dir / EXAMPLES_FILE, "".join(json.dumps(record) + "\n" for record in records))
    save_reliability_diagram(out_dir / RELIABILITY_FILE, prediction.probs, prediction.labels, title)
    write_json_atomic(out_dir / METRICS_FILE, metrics)


def load_predictions(eval_dir: str | Path) -> Prediction:
    """The saved probabilities, labels and (when kept) per-sample probabilities of an evaluation directory."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(eval_dir) / PREDICTIONS_FILE))
    return Prediction(
        probs=tensors["probs"], labels=tensors["labels"].to(torch.long), sample_probs=tensors.get("sample_probs")
    )


def ood_record(in_distribution: Prediction, out_of_distribution: Prediction) -> dict[str, Any]:
    """How well the predictive's uncertainty tells an out-of-distribution task's examples from the in-distribution
    ones: the AUROC of the predictive entropy (``auroc_entropy``) and of the mutual information
    (``auroc_mutual_information``, 0.5 for a deterministic model), and the number of examples of each."""
    inside = uncertainty(in_distribution.probs, in_distribution.sample_probs)
    outside = uncertainty(out_of_distribution.probs, out_of_distribution.sample_probs)
    return {
        "auroc_entropy": ood_auroc(inside["entropy"], outside["entropy"]),
        "auroc_mutual_information": ood_auroc(inside["mutual_information"], outside["mutual_information"]),
        "n_in": len(in_distribution.labels),
        "n_out": len(out_of_distribution.labels),
    }
