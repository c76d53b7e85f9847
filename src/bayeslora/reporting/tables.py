"""Tables of evaluation results (markdown, readable in a terminal and in files)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: (column title, metrics.json key, format) of the standard table.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("task", "task", "{}"),
    ("method", "method", "{}"),
    ("N", "n_samples", "{}"),
    ("acc %", "accuracy", "{:.1f}"),
    ("ECE %", "ece", "{:.1f}"),
    ("NLL", "nll", "{:.3f}"),
    ("Brier", "brier", "{:.3f}"),
    ("token NLL", "token_nll", "{:.3f}"),  # instruction data: per completion token, under the posterior predictive
    ("perplexity", "perplexity", "{:.2f}"),
    ("examples", "n_examples", "{}"),
    ("trainable", "trainable_params", "{:,}"),
    ("step s", "step_time_s", "{:.2f}"),
    ("step MiB", "step_memory_mb", "{:.0f}"),
    ("train MiB", "train_peak_memory_mb", "{:.0f}"),  # the run's own peak resident set while training
    ("eval MiB", "eval_peak_memory_mb", "{:.0f}"),  # ... while evaluating this task
    ("process MiB", "peak_memory_mb", "{:.0f}"),
)
_PERCENT = {"accuracy", "ece", "accuracy_at_coverage"}

#: The out-of-distribution table of ``bayeslora report``: per in-distribution evaluation and OOD task, the AUROC
#: of telling the OOD task's examples apart by predictive entropy and by mutual information, and its metrics.
OOD_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("task", "task", "{}"),
    ("method", "method", "{}"),
    ("seed", "seed", "{}"),
    ("OOD task", "ood_task", "{}"),
    ("AUROC entropy", "auroc_entropy", "{:.3f}"),
    ("AUROC MI", "auroc_mutual_information", "{:.3f}"),
    ("OOD acc %", "accuracy", "{:.1f}"),
    ("OOD ECE %", "ece", "{:.1f}"),
)

#: The comparison table of ``bayeslora report``: the standard columns plus the seed (runs of one method
#: differ by it), training time, a post-hoc posterior's fitting time (Laplace) and evaluation time.
REPORT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    *COLUMNS[:2],
    ("seed", "seed", "{}"),
    *COLUMNS[2:3],
    ("predictive", "predictive", "{}"),  # a posterior's predictive other than N samples of every layer
    *COLUMNS[3:9],
    ("AURC", "aurc", "{:.3f}"),
    ("acc@80% %", "accuracy_at_coverage.0.8", "{:.1f}"),
    *COLUMNS[9:12],
    ("train s", "train_runtime_s", "{:.0f}"),
    ("post-hoc fit s", "laplace_fit_s", "{:.0f}"),
    ("eval s", "eval_time_s", "{:.0f}"),
    *COLUMNS[12:],
)


def predictive_label(metrics: dict[str, Any]) -> str | None:
    """How an evaluation's posterior predicted, when not by samples of every Bayesian layer (the default): its
    ``posterior_predictive`` (``glm``, ``probit``) and ``sample_layers`` (``last:K``), e.g. ``samples, last:1``;
    None for the default and for a deterministic method."""
    predictive, layers = metrics.get("posterior_predictive"), metrics.get("sample_layers", "all")
    if predictive in (None, "samples") and (layers == "all" or metrics.get("n_samples", 1) <= 1):
        return None  # N samples of every layer, or the posterior mean (N ≤ 1: the N column says so)
    return ", ".join(part for part in (predictive or "samples", None if layers == "all" else layers) if part)


def _value(row: dict[str, Any], key: str) -> Any:
    """``row[key]``; a dotted key reads a nested entry (``accuracy_at_coverage.0.8``)."""
    if key in row or "." not in key:
        return row.get(key)
    head, _, rest = key.partition(".")
    inner = row.get(head)
    return inner.get(rest) if isinstance(inner, dict) else None


def cell(row: dict[str, Any], key: str, fmt: str) -> str:
    """One formatted table cell (fractions shown as percentages, – when missing)."""
    value = _value(row, key)
    if value is None:
        return "–"
    if key.partition(".")[0] in _PERCENT:
        value = 100 * value
    if key == "train_runtime_s" and row.get("train_runtime_unmeasured_steps"):
        return "≥" + fmt.format(value)  # resumed from a checkpoint that kept no record of its time
    return fmt.format(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]] = COLUMNS) -> str:
    """A markdown table of metrics rows; columns that no row has are left out."""
    used = [c for c in columns if any(_value(row, c[1]) is not None for row in rows)]
    lines = ["| " + " | ".join(title for title, _, _ in used) + " |"]
    lines.append("|" + "|".join("---" for _ in used) + "|")
    for row in rows:
        lines.append("| " + " | ".join(cell(row, key, fmt) for _, key, fmt in used) + " |")
    return "\n".join(lines)


def ood_rows(evaluations: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (in-distribution evaluation, OOD task) of the ``ood`` entries in ``evaluations``, with the OOD
    task's own accuracy and ECE when its evaluation (of the same run) is among them."""
    by_run = {(row.get("run"), row.get("task"), row.get("method")): row for row in evaluations}
    rows = []
    for row in evaluations:
        for ood_task, scores in row.get("ood", {}).items():
            own = by_run.get((row.get("run"), ood_task, row.get("method")), {})
            rows.append(
                {
                    "task": row["task"],
                    "method": row["method"],
                    "seed": row.get("seed"),
                    "ood_task": ood_task,
                    **scores,
                    "accuracy": own.get("accuracy"),
                    "ece": own.get("ece"),
                }
            )
    return rows
