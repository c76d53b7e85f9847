"""``bayeslora demo`` / ``make demo``: fine-tune the embedded default and print the calibration table.

The recipe is ``configs/lora/smollm2-135m-arc-easy.yaml`` (kept identical to :data:`DEMO_RECIPE`):
SmolLM2-135M-Instruct on ARC-Easy with cloze scoring, evaluated zero-shot and after fine-tuning on the
same fixed subsample of the validation split.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .api import evaluate, train
from .config import make_config
from .io import read_json
from .report import format_table
from .runs import eval_dir

#: The demo's training recipe (also in configs/lora/smollm2-135m-arc-easy.yaml).
DEMO_RECIPE: dict[str, Any] = {
    "model": "smollm2-135m",
    "task": "arc-easy",
    "method": "lora",
    "scoring": "cloze",
    "rank": 8,
    "alpha": 16.0,
    "max_steps": 100,
    "batch_size": 4,
    "lr": 1e-3,
    "seed": 1,
    "limit": 300,
}


def run_demo(output_dir: str | Path | None = None, *, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate the base model zero-shot, fine-tune it with LoRA, evaluate again; print and return the rows."""
    root = Path(output_dir) if output_dir else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    config = make_config(**DEMO_RECIPE, output_dir=str(root / "lora"))
    started = time.perf_counter()
    print(f"bayeslora demo: {config.model} on {config.task} ({config.scoring} scoring), results in {root}\n")
    print("1/2 zero-shot evaluation")
    zero_shot = evaluate(
        model=config.model,
        task=config.task,
        limit=config.limit,
        output_dir=root / "zero-shot",
        scoring=config.scoring,
        progress=progress,
    )
    print("2/2 LoRA fine-tuning, then evaluation")
    run = train(config, progress=progress)
    rows = [zero_shot, read_json(eval_dir(run, config.task) / "metrics.json")]
    elapsed = time.perf_counter() - started
    print()
    print(format_table(rows))
    print(f"\nReliability diagrams: {root}/*/eval/{config.task}/reliability.png   (demo took {elapsed / 60:.1f} min)")
    return rows
