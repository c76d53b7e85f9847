"""``bayeslora report``: one table per evaluation task over many runs, reliability figures, bit operations, and a
self-contained HTML page."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .tables import OOD_COLUMNS, REPORT_COLUMNS, format_table, ood_rows, predictive_label


def _task_rows(evaluations: list[tuple[dict[str, Any], Any]], task: str) -> list[dict[str, Any]]:
    """The evaluation records of ``task``, each with its predictive's label (how its probabilities were made)."""
    return [{**record, "predictive": predictive_label(record)} for record, _ in evaluations if record["task"] == task]


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
    """Markdown: per evaluation task, one table of every method of ``runs`` that was evaluated on it (their
    ``eval/*/metrics.json``, temperature-scaled rows included) with its seed, accuracy, ECE, NLL, Brier,
    trainable parameters, training, post-hoc fitting and evaluation time; then, for runs that learn their
    structure, their bit operations per layer and in total for ``sequence_length`` tokens. With ``out``, also writes
    ``report.md``, ``report.json``, per task ``reliability-<task>.png`` (every method side by side) and
    ``accuracy-ece-<task>.png``, and a self-contained ``report.html`` with all of it."""
    from ..evaluation import load_predictions
    from ..evaluation.reliability import save_reliability_grid
    from ..io import read_json, write_json_atomic, write_text_atomic
    from ..runs import BOPS_FILE, CONFIG_FILE, EVAL_DIR, eval_dir

    if sequence_length <= 0:
        raise ValueError(f"--sequence-length must be positive, got {sequence_length}")
    evaluations: list[tuple[dict[str, Any], Path]] = []
    sections: list[str] = []
    bops: dict[str, Any] = {}
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise FileExistsError(f"--out {out} is a file; the report is a directory: choose another --out")
    for run in map(Path, runs):
        if not run.is_dir():
            raise FileNotFoundError(f"{run} does not exist (report takes run directories)")
        found = [(read_json(path), path.parent) for path in sorted((run / EVAL_DIR).glob("*/metrics.json"))]
        if not found and not (run / BOPS_FILE).is_file():
            if not (run / CONFIG_FILE).is_file():
                raise FileNotFoundError(
                    f"{run} is not a bayeslora run directory (neither {CONFIG_FILE} nor eval/<task>/metrics.json): "
                    f"report takes the directories that `bayeslora train` and `bayeslora eval` write"
                )
            raise ValueError(f"{run} holds no evaluation (eval/<task>/metrics.json); run `bayeslora eval --run {run}`")
        evaluations += found
        if (run / BOPS_FILE).is_file():
            bops[str(run)] = read_json(run / BOPS_FILE)
            sections += _bops_section(run, bops[str(run)], sequence_length)
    tasks = list(dict.fromkeys(record["task"] for record, _ in evaluations))
    parts = ["# bayeslora report", ""]
    for task in tasks:
        rows = _task_rows(evaluations, task)
        parts += [f"## {task}", "", format_table(rows, REPORT_COLUMNS), ""]
    if not tasks:
        parts += ["(no evaluations)", ""]
    if ood := ood_rows([record for record, _ in evaluations]):
        parts += ["## Out of distribution", "", format_table(ood, OOD_COLUMNS), ""]
    text = "\n".join([*parts, *sections])
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for task in tasks:
            panels = []
            for record, directory in evaluations:
                if record["task"] == task:
                    prediction = load_predictions(directory)
                    title = f"{record['method']}, seed {record.get('seed')} (N={record.get('n_samples', 1)})"
                    panels.append((title, prediction.probs, prediction.labels))
            save_reliability_grid(
                out / f"reliability-{eval_dir(out, task).name}.png", panels, columns=min(4, len(panels))
            )
        write_text_atomic(out / "report.md", text)
        _write_html(out, tasks, evaluations, runs, bops)
        records = [record for record, _ in evaluations]
        write_json_atomic(
            out / "report.json", {"evaluations": records, "bops": bops, "sequence_length": sequence_length}
        )
    return text


def _write_html(out: Path, tasks: list[str], evaluations: list, runs: Sequence[str | Path], bops: dict) -> None:
    """``report.html`` next to ``report.md``, with its figures inlined (see :mod:`bayeslora.reporting.html`)."""
    from ..io import write_text_atomic
    from ..runs import STRUCTURE_PLOT, eval_dir
    from .html import render_html
    from .plots import save_accuracy_ece_scatter, save_cost_bars

    sections = []
    for task in tasks:
        rows = _task_rows(evaluations, task)
        name = eval_dir(out, task).name
        save_accuracy_ece_scatter(out / f"accuracy-ece-{name}.png", rows, title=f"accuracy against ECE on {task}")
        sections.append((task, rows, out / f"reliability-{name}.png", out / f"accuracy-ece-{name}.png"))
    trained = [record for record, _ in evaluations if record.get("step_time_s") is not None]
    costs = None
    if trained:
        save_cost_bars(out / "step-cost.png", trained)
        costs = out / "step-cost.png"
    structures = [(str(run), Path(run) / STRUCTURE_PLOT) for run in runs if (Path(run) / STRUCTURE_PLOT).is_file()]
    notes = [
        f"{run}: adapter path {report['adapter_ratio']:.3f}x the 16-bit LoRA's bit operations, all adapted layers "
        f"{report['total_ratio']:.3f}x ({report['convention']})"
        for run, report in bops.items()
    ]
    write_text_atomic(out / "report.html", render_html(sections, costs, structures, notes, REPORT_COLUMNS))
