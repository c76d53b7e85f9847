"""``bayeslora demo`` / ``make demo``: fine-tune the embedded default with LoRA, BLoB and Me-LoRA and print
one table (accuracy, ECE, NLL, Brier, trainable parameters, step time, step memory), and how well each run's
uncertainty tells questions from another distribution (MMLU college physics) from its own: the AUROC of the
predictive entropy and, for the Bayesian runs, of the mutual information (the part of the uncertainty that is about
the weights).

The recipes are ``configs/<method>/smollm2-135m-arc-easy.yaml`` (kept identical to :data:`DEMO_RECIPE`
plus :data:`DEMO_METHODS`): SmolLM2-135M-Instruct on a fixed subset of ARC-Easy's training split with
cloze scoring, several epochs (LoRA over-fits), evaluated zero-shot and after fine-tuning on the same
fixed subsample of the validation split; Bayesian methods average :data:`DEMO_SAMPLES` posterior
samples. Every run keeps its reliability diagram, and ``reliability.png`` puts them side by side.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..config import make_config
from ..evaluation import load_predictions
from ..evaluation.reliability import save_reliability_grid
from ..io import read_json
from ..reporting.tables import COLUMNS, OOD_COLUMNS, format_table, ood_rows
from ..runs import eval_dir
from .evaluate import evaluate
from .train import train

#: What every demo run shares (also in each configs/<method>/smollm2-135m-arc-easy.yaml).
DEMO_RECIPE: dict[str, Any] = {
    "model": "smollm2-135m",
    "task": "arc-easy",
    "scoring": "cloze",
    "rank": 8,
    "alpha": 16.0,
    "train_size": 80,
    "max_steps": 80,
    "batch_size": 4,
    "lr": 1e-3,
    "seed": 1,
    "limit": 300,
    "ood_tasks": ["mmlu:college_physics"],
}

#: Posterior samples the Bayesian demo runs average at evaluation.
DEMO_SAMPLES = 4

#: The methods the demo trains, each with its options beyond :data:`DEMO_RECIPE`.
DEMO_METHODS: dict[str, dict[str, Any]] = {
    "lora": {},
    "blob": {"samples": DEMO_SAMPLES},
    "melora": {"samples": DEMO_SAMPLES},
}


def demo_recipe(method: str) -> dict[str, Any]:
    """The full recipe of the demo's ``method`` run."""
    return {**DEMO_RECIPE, "method": method, **DEMO_METHODS[method]}


def run_demo(output_dir: str | Path | None = None, *, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate the base model zero-shot, then fine-tune and evaluate each demo method; print and return
    the rows of the table."""
    root = Path(output_dir) if output_dir else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.perf_counter()
    task, model, steps = DEMO_RECIPE["task"], DEMO_RECIPE["model"], DEMO_RECIPE["max_steps"]
    print(
        f"bayeslora demo: {model} on {task} ({DEMO_RECIPE['scoring']} scoring), {steps} steps of "
        f"{DEMO_RECIPE['batch_size']} on {DEMO_RECIPE['train_size']} training questions per method; "
        f"results in {root}\n"
    )
    total = len(DEMO_METHODS) + 1
    print(f"1/{total} zero-shot evaluation", flush=True)
    shared = {key: value for key, value in DEMO_RECIPE.items() if key not in ("model", "task", "limit", "ood_tasks")}
    zero_shot = evaluate(
        model=model,
        task=task,
        limit=DEMO_RECIPE["limit"],
        ood_tasks=DEMO_RECIPE["ood_tasks"],
        output_dir=root / "zero-shot",
        progress=progress,
        **shared,
    )
    rows = [zero_shot]
    panels = [("zero-shot", eval_dir(root / "zero-shot", task))]
    for number, method in enumerate(DEMO_METHODS, start=2):
        config = make_config(**demo_recipe(method), output_dir=str(root / method))
        print(f"{number}/{total} {method}: fine-tuning, then evaluation", flush=True)
        run = train(config, progress=progress)
        rows.append(read_json(eval_dir(run, task) / "metrics.json"))
        panels.append((f"{method} (N={rows[-1]['n_samples']})", eval_dir(run, task)))
    figure = root / "reliability.png"
    save_reliability_grid(
        figure, [(title, *_probs_and_labels(directory)) for title, directory in panels], columns=len(panels)
    )
    elapsed = time.perf_counter() - started
    print()
    # every run shares this process, so its peak resident memory would include the earlier runs': left out
    print(format_table(rows, [column for column in COLUMNS if column[1] != "peak_memory_mb"]))
    print(
        f"\nTelling {', '.join(DEMO_RECIPE['ood_tasks'])} questions from {task}'s by the predictive's uncertainty "
        f"(AUROC; 0.5 = chance; the mutual information is 0 for a deterministic model):\n"
    )
    print(format_table(ood_rows(rows), [column for column in OOD_COLUMNS if column[1] != "seed"]))
    print(
        f"\nReliability diagrams: {figure} (one per run in {root}/*/eval/{task}/)   (demo took {elapsed / 60:.1f} min)"
    )
    return rows


def _probs_and_labels(directory: Path):
    prediction = load_predictions(directory)
    return prediction.probs, prediction.labels
