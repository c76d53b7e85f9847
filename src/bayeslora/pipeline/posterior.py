"""``bayeslora posterior``: the posterior width of trained runs (loads each run; the measure itself is
:mod:`bayeslora.reporting.posterior`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import write_json_atomic, write_text_atomic
from ..reporting.posterior import WIDTH_COLUMNS, posterior_widths, summarize_widths
from ..reporting.tables import format_table
from .common import load_run


def posterior_report(runs: Sequence[str | Path], out: str | Path | None = None) -> str:
    """Markdown: per run, the posterior width per module kind (median over its layers). With ``out``, also writes
    ``posterior.md`` and ``posterior.json`` (every layer of every run) into that directory. A run without a Bayesian
    layer (LoRA, MAP, a deterministic B-LoRA) is refused by name."""
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise FileExistsError(f"--output-dir {out} is a file: choose a directory")
    layers: dict[str, list[dict[str, Any]]] = {}
    rows: list[dict[str, Any]] = []
    for run in runs:
        loaded = load_run(run, progress=False)
        records = posterior_widths(loaded.model)
        if not records:
            raise ValueError(
                f"{run} (method {loaded.config.method}) has no Bayesian layer: its adapter has no posterior to "
                f"measure. Give a run of melora, blob, or blora with --bayesian-core."
            )
        layers[str(run)] = records
        rows += [{"run": Path(run).name, **row} for row in summarize_widths(records)]
        del loaded
    text = "\n".join(
        [
            "## Posterior width (median over each module kind's layers)",
            "",
            "noise = √E‖ΔW − E ΔW‖²_F, mean update = ‖E ΔW‖_F, W0 the frozen weight; σ / |M| per random entry.",
            "",
            format_table(rows, WIDTH_COLUMNS),
            "",
        ]
    )
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(out) / "posterior.json", {"summary": rows, "layers": layers})
        write_text_atomic(Path(out) / "posterior.md", text)
    return text
