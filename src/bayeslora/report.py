"""Tables of evaluation results (markdown, readable in a terminal and in files)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
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


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    if key in _PERCENT:
        value = 100 * value
    return fmt.format(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]] = COLUMNS) -> str:
    """A markdown table of metrics rows; columns that no row has are left out."""
    used = [c for c in columns if any(row.get(c[1]) is not None for row in rows)]
    lines = ["| " + " | ".join(title for title, _, _ in used) + " |"]
    lines.append("|" + "|".join("---" for _ in used) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key, fmt) for _, key, fmt in used) + " |")
    return "\n".join(lines)


def _bops_section(run: Path, report: dict[str, Any], sequence_length: int) -> list[str]:
    scale = sequence_length / report.get("sequence_length", 1)
    unit = "per token" if sequence_length == 1 else f"for {sequence_length} tokens"
    lines = [
        f"### Bit operations of {run} ({unit}; GBOPs)",
        "",
        "| layer | rank | bits | adapter | base | adapter vs 16-bit LoRA |",
        "|---|---|---|---|---|---|",
    ]
    for layer in report["layers"]:
        bits = " ".join(f"{name}{value}" for name, value in layer["bits"].items())
        adapter, base = scale * layer["adapter"] / 1e9, scale * layer["base"] / 1e9
        ratio = layer["adapter"] / layer["reference_adapter"]
        rank = f"{layer['rank']}/{layer['max_rank']}"
        lines.append(f"| {layer['name']} | {rank} | {bits} | {adapter:.4f} | {base:.3f} | {ratio:.3f} |")
    giga = {
        key: scale * report[key] / 1e9 for key in ("adapter", "base", "total", "reference_adapter", "reference_total")
    }
    lines += [
        "",
        f"Total: adapter {giga['adapter']:.3f} GBOPs ({report['adapter_ratio']:.3f}x the 16-bit LoRA's "
        f"{giga['reference_adapter']:.3f}), base {giga['base']:.3f}, all {giga['total']:.3f} "
        f"({report['total_ratio']:.3f}x {giga['reference_total']:.3f}).",
        f"Convention: {report['convention']}.",
        "",
    ]
    return lines


def run_report(runs: Sequence[str | Path], sequence_length: int = 1, out: str | Path | None = None) -> str:
    """Markdown: one table of every evaluation of ``runs`` (their ``eval/*/metrics.json``), then, for B-LoRA
    runs, their bit operations per layer and in total for ``sequence_length`` tokens. With ``out``, also
    writes ``report.md`` and ``report.json`` there."""
    from .io import read_json, write_json_atomic, write_text_atomic
    from .runs import BOPS_FILE, EVAL_DIR

    if sequence_length <= 0:
        raise ValueError(f"--sequence-length must be positive, got {sequence_length}")
    rows: list[dict[str, Any]] = []
    sections: list[str] = []
    bops: dict[str, Any] = {}
    for run in map(Path, runs):
        if not run.is_dir():
            raise FileNotFoundError(f"{run} is not a run directory")
        found = [read_json(path) for path in sorted((run / EVAL_DIR).glob("*/metrics.json"))]
        if not found and not (run / BOPS_FILE).is_file():
            raise ValueError(f"{run} holds no evaluation (eval/<task>/metrics.json); run `bayeslora eval --run {run}`")
        rows += found
        if (run / BOPS_FILE).is_file():
            bops[str(run)] = read_json(run / BOPS_FILE)
            sections += _bops_section(run, bops[str(run)], sequence_length)
    text = "\n".join(["# bayeslora report", "", format_table(rows) if rows else "(no evaluations)", "", *sections])
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "report.md", text)
        write_json_atomic(out / "report.json", {"evaluations": rows, "bops": bops, "sequence_length": sequence_length})
    return text
