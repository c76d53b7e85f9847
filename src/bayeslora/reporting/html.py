"""``report.html``: one self-contained page (images inlined) with the comparison tables, the reliability
diagrams, accuracy against ECE, the cost of a training step, and the learned structure of gated runs."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: right; }
th { background: #f3f3f3; } td:first-child, td:nth-child(2) { text-align: left; }
figure { margin: 0.5rem 0 1.5rem; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.8rem; color: #555; } p.note { font-size: 0.8rem; color: #555; }
"""


def _image(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    from .tables import cell

    used = [c for c in columns if any(row.get(c[1]) is not None for row in rows)]
    head = "".join(f"<th>{html.escape(title)}</th>" for title, _, _ in used)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell(row, key, fmt))}</td>" for _, key, fmt in used) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(
    tasks: Sequence[tuple[str, list[dict[str, Any]], Path, Path]],
    costs: Path | None,
    structures: Sequence[tuple[str, Path]],
    bops_notes: Sequence[str],
    columns: Sequence[tuple[str, str, str]],
) -> str:
    """The page. ``tasks``: (task, its rows, its reliability figure, its accuracy-ECE scatter); ``costs``: the
    step time / memory bars; ``structures``: (run, structure heatmap); ``bops_notes``: one line per run."""
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>bayeslora report</title>",
        f"<style>{STYLE}</style></head><body><h1>bayeslora report</h1>",
    ]
    for task, rows, reliability, scatter in tasks:
        parts += [f"<h2>{html.escape(task)}</h2>", _table(rows, columns)]
        parts += [
            _image(reliability, f"Reliability diagrams on {task}, one per method"),
            _image(scatter, f"Accuracy against ECE on {task}"),
        ]
    if costs is not None:
        parts += [
            "<h2>Cost of a training step</h2>",
            _image(costs, "Step time and the peak memory of a step above the model"),
        ]
    if structures:
        parts.append("<h2>Learned structure</h2>")
        parts += [f"<p class='note'>{html.escape(note)}</p>" for note in bops_notes]
        parts += [_image(path, f"Rank and bit-width per block and module: {run}") for run, path in structures]
    parts.append("</body></html>")
    return "\n".join(parts)
