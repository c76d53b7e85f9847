"""Plots of reports (matplotlib, no display needed): B-LoRA's learned structure, accuracy against ECE, the cost of
a training step. Reliability diagrams are drawn by :mod:`bayeslora.evaluation.reliability`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ..io import atomic_path


def _layer_and_module(name: str) -> tuple[str, str]:
    """``(layer index or the module's parent, module)`` of an adapted module's qualified name."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit() and i > 0 and parts[i - 1] in ("layers", "layer", "h", "blocks"):
            return part, parts[-1]
    return "–", parts[-1]


def save_structure_heatmap(path: str | Path, layers: Sequence[dict], title: str = "") -> None:
    """Write a PNG of B-LoRA's learned structure: one heatmap per quantity (rank, then the bits of every
    quantized tensor), rows = transformer blocks, columns = adapted modules; ``layers`` are the entries of
    :func:`bayeslora.bops.bops_report`'s ``layers``."""
    import numpy as np

    if not layers:
        raise ValueError("no adapted layers to draw")
    placed = [(*_layer_and_module(layer["name"]), layer) for layer in layers]
    rows = sorted({row for row, _, _ in placed}, key=lambda r: (not r.isdigit(), int(r) if r.isdigit() else 0))
    columns = sorted({column for _, column, _ in placed})
    quantities = ["rank", *sorted({t for layer in layers for t in layer["bits"]})]
    fig, axes = plt.subplots(
        1, len(quantities), figsize=(1.2 + 1.1 * len(columns) * len(quantities), 1.5 + 0.28 * len(rows)), dpi=110
    )
    axes = np.atleast_1d(axes)
    try:
        for ax, quantity in zip(axes, quantities, strict=True):
            grid = np.full((len(rows), len(columns)), np.nan)
            for row, column, layer in placed:
                value = layer["rank"] if quantity == "rank" else layer["bits"].get(quantity, np.nan)
                grid[rows.index(row), columns.index(column)] = value
            top = max(layer["max_rank"] for layer in layers) if quantity == "rank" else 32
            image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0 if quantity == "rank" else 2, vmax=top)
            for (i, j), value in np.ndenumerate(grid):
                if not np.isnan(value):  # dark text on the light (high) end of viridis
                    color = "black" if value > 0.6 * top else "white"
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7, color=color)
            ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
            ax.set_yticks(range(len(rows)), rows, fontsize=7)
            ax.set_title("rank" if quantity == "rank" else f"bits of {quantity}", fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.08)
        axes[0].set_ylabel("block")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def _label(row: dict) -> str:
    return f"{row['method']} ({Path(str(row.get('run', ''))).name})" if row.get("run") else str(row["method"])


def save_accuracy_ece_scatter(path: str | Path, rows: Sequence[dict], title: str = "") -> None:
    """Write a PNG scatter of accuracy (%) against ECE (%), one labelled point per evaluation row: up and to
    the left is better."""
    fig, ax = plt.subplots(figsize=(5.6, 4.4), dpi=110)
    try:
        for row in rows:
            x, y = 100 * row["ece"], 100 * row["accuracy"]
            ax.scatter([x], [y], s=36)
            ax.annotate(str(row["method"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("ECE (%)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title or "accuracy against calibration error", fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def save_cost_bars(path: str | Path, rows: Sequence[dict]) -> None:
    """Write a PNG of two bar charts over the trained runs: step time (s) and the peak memory of a step
    above the model (MiB), from their ``metrics.json`` (rows without those figures are left out)."""
    rows = [r for r in rows if r.get("step_time_s") is not None]
    if not rows:
        raise ValueError("no trained runs with step time to draw")
    labels = [_label(r) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.1 * len(rows) + 3), 3.8), dpi=110)
    try:
        for ax, key, unit in (
            (axes[0], "step_time_s", "step time (s)"),
            (axes[1], "step_memory_mb", "step memory (MiB)"),
        ):
            values = [r.get(key) or 0 for r in rows]
            ax.bar(range(len(rows)), values, color="#4C72B0")
            ax.set_xticks(range(len(rows)), labels, rotation=40, ha="right", fontsize=7)
            ax.set_title(unit, fontsize=9)
            ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
