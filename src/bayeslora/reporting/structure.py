"""What a trained adapter is made of: bit operations and the rank / bit-width of every adapted matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..io import write_json_atomic
from ..runs import BOPS_FILE, STRUCTURE_PLOT
from .bops import bops_report
from .plots import save_structure_heatmap


def short_name(name: str) -> str:
    """A module's name without PEFT's wrapper prefix (``base_model.model.``)."""
    return name.removeprefix("base_model.model.")


def structure_record(model: nn.Module) -> dict[str, Any]:
    """What a trained run's ``metrics.json`` adds: per-token ``bops`` (adapter, base, total and the 16-bit
    LoRA reference, with the convention) and the ``structure`` (rank and bits of every adapted matrix:
    learned by B-LoRA and AdaLoRA, as configured otherwise). Empty for models without adapter layers."""
    try:
        report = bops_report(model)
    except ValueError:
        return {}
    return {
        "bops": {key: value for key, value in report.items() if key != "layers"},
        "structure": {
            short_name(layer["name"]): {"rank": layer["rank"], "bits": layer["bits"]} for layer in report["layers"]
        },
    }


def write_structure(model: nn.Module, run: Path, title: str = "") -> None:
    """``bops.json`` (per layer and in total) and ``structure.png`` (learned rank and bits heatmaps) of a run
    that learns its structure."""
    report = bops_report(model)
    for layer in report["layers"]:
        layer["name"] = short_name(layer["name"])
    write_json_atomic(run / BOPS_FILE, report)
    save_structure_heatmap(run / STRUCTURE_PLOT, report["layers"], title)
