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
    ("examples", "n_examples", "{}"),
    ("trainable", "trainable_params", "{:,}"),
    ("step s", "step_time_s", "{:.2f}"),
    ("step MiB", "step_memory_mb", "{:.0f}"),
    ("process MiB", "peak_memory_mb", "{:.0f}"),
)
_PERCENT = {"accuracy", "ece"}

#: The comparison table of ``bayeslora report``: the standard columns plus the seed (runs of one method
#: differ by it), training time, a post-hoc posterior's fitting time (Laplace) and evaluation time.
REPORT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    *COLUMNS[:2],
    ("seed", "seed", "{}"),
    *COLUMNS[2:10],
    ("train s", "train_runtime_s", "{:.0f}"),
    ("post-hoc fit s", "laplace_fit_s", "{:.0f}"),
    ("eval s", "eval_time_s", "{:.0f}"),
    *COLUMNS[10:],
)


def cell(row: dict[str, Any], key: str, fmt: str) -> str:
    """One formatted table cell (fractions shown as percentages, – when missing)."""
    value = row.get(key)
    if value is None:
        return "–"
    if key in _PERCENT:
        value = 100 * value
    if key == "train_runtime_s" and row.get("train_runtime_unmeasured_steps"):
        return "≥" + fmt.format(value)  # resumed from a checkpoint that kept no record of its time
    return fmt.format(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]] = COLUMNS) -> str:
    """A markdown table of metrics rows; columns that no row has are left out."""
    used = [c for c in columns if any(row.get(c[1]) is not None for row in rows)]
    lines = ["| " + " | ".join(title for title, _, _ in used) + " |"]
    lines.append("|" + "|".join("---" for _ in used) + "|")
    for row in rows:
        lines.append("| " + " | ".join(cell(row, key, fmt) for _, key, fmt in used) + " |")
    return "\n".join(lines)
