"""Evaluation: how a task is put to a model (scoring), the predictive distribution over posterior samples, metrics
and their intervals, temperature scaling, reliability diagrams, and the files an evaluation writes."""

from .evaluate import (
    EXAMPLES_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    RELIABILITY_FILE,
    eval_examples,
    evaluate_model,
    load_predictions,
    write_evaluation,
)

__all__ = [
    "EXAMPLES_FILE",
    "METRICS_FILE",
    "PREDICTIONS_FILE",
    "RELIABILITY_FILE",
    "eval_examples",
    "evaluate_model",
    "load_predictions",
    "write_evaluation",
]
