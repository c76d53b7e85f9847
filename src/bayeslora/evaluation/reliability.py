"""Reliability diagrams (matplotlib, no display needed): accuracy per confidence bin against the diagonal, binned
exactly as the ECE is."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from torch import Tensor

from ..io import atomic_path
from .metrics import ECE_BINS, reliability_bins


def draw_reliability(ax, probs: Tensor, labels: Tensor, title: str = "", n_bins: int = ECE_BINS) -> None:
    """Draw a reliability diagram on ``ax``: accuracy per confidence bin against the diagonal, with the
    gap shaded and the share of examples per bin as a lower strip."""
    bins = reliability_bins(probs, labels, n_bins)
    # the final torchmetrics slot (confidence exactly 1) is drawn within the last bin
    count = bins.count[:n_bins].clone()
    acc_sum = bins.accuracy[:n_bins] * count
    conf_sum = bins.confidence[:n_bins] * count
    count[-1] += bins.count[n_bins]
    acc_sum[-1] += bins.accuracy[n_bins] * bins.count[n_bins]
    conf_sum[-1] += bins.confidence[n_bins] * bins.count[n_bins]
    safe = count.clamp_min(1)
    accuracy, confidence = (acc_sum / safe).numpy(), (conf_sum / safe).numpy()
    left = bins.edges[:-1].numpy()
    width = 1.0 / n_bins
    filled = count.numpy() > 0
    ax.bar(
        left[filled],
        accuracy[filled],
        width=width,
        align="edge",
        color="#4C72B0",
        edgecolor="white",
        label="accuracy",
    )
    ax.bar(
        left[filled],
        (confidence - accuracy)[filled],
        bottom=accuracy[filled],
        width=width,
        align="edge",
        color="#DD8452",
        alpha=0.45,
        edgecolor="white",
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1)
    share = count.numpy() / max(1.0, float(count.sum()))
    ax.bar(
        left,
        -0.12 * share / max(share.max(), 1e-12),
        width=width,
        align="edge",
        color="#55A868",
        label="examples (scaled)",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.13, 1)
    ax.set_xlabel("confidence (top-1)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE {bins.ece * 100:.1f}%  (n={int(bins.count.sum())}, {n_bins} bins)", fontsize=10)
    ax.legend(loc="upper left", fontsize=7, frameon=False)


def save_reliability_diagram(path: str | Path, probs: Tensor, labels: Tensor, title: str = "") -> None:
    """Write a reliability diagram PNG to ``path`` (atomically)."""
    fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=120)
    try:
        draw_reliability(ax, probs, labels, title)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def save_reliability_grid(path: str | Path, panels: Sequence[tuple[str, Tensor, Tensor]], columns: int = 4) -> None:
    """Write one PNG with a reliability diagram per ``(title, probs, labels)`` panel, side by side
    (``columns`` per row), to ``path`` (atomically)."""
    if not panels:
        raise ValueError("no reliability diagrams to draw")
    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 4.2 * rows), dpi=110, squeeze=False)
    try:
        for ax, (title, probs, labels) in zip(axes.flat, panels, strict=False):
            draw_reliability(ax, probs, labels, title)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
