"""Calibration at small scale: the BLoB protocol shrunk to SmolLM2-135M on 2 CPU cores.

Every (task, method, seed) is a real ``bayeslora.train`` run (cloze scoring) evaluated on a fixed seeded
subset of the validation split with N posterior samples; each epoch also evaluates the current model
(LoRA as is, Bayesian methods with their posterior mean) to show how calibration moves as the adapter
over-fits. Finished runs are reused, so the script can be stopped and restarted.

    python benchmarks/calibration.py                         # the recorded configuration (hours on 2 cores)
    python benchmarks/calibration.py --tasks arc-easy --seeds 1 --epochs 2 --tag quick

Writes ``benchmarks/results/calibration/<tag>.json`` and ``<tag>.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

import bayeslora as bl
from bayeslora.evaluation import eval_examples, evaluate_model
from bayeslora.io import read_json, write_json_atomic, write_text_atomic
from bayeslora.runs import eval_dir

RESULTS = Path(__file__).resolve().parent / "results" / "calibration"


class EpochEval(TrainerCallback):
    """Evaluate the model at the end of every epoch (deterministic methods as they are, Bayesian ones with
    their posterior mean) and keep the metrics."""

    def __init__(self, config: bl.RunConfig, n_samples: int) -> None:
        self.config = config
        self.n_samples = n_samples
        self.history: list[dict[str, Any]] = []
        task = bl.load_task(config.task)
        self.examples = eval_examples(task, config.limit)
        self.scorer = bl.build_scorer(task, bl.load_tokenizer(config.model), config)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        metrics, _ = evaluate_model(model, self.scorer, self.examples, n_samples=self.n_samples, progress=False)
        model.train()
        self.history.append({"epoch": round(state.epoch), "step": state.global_step, **metrics})
        print(
            f"  epoch {round(state.epoch)}: acc {metrics['accuracy']:.3f} ece {metrics['ece']:.3f} "
            f"nll {metrics['nll']:.3f}",
            flush=True,
        )


def run_one(task: str, method: str, seed: int, args, overrides: dict[str, Any], root: Path) -> dict[str, Any]:
    """Train + evaluate one configuration (or reuse its finished run); returns its metrics."""
    run_dir = root / f"{task}-{method}-seed{seed}"
    metrics_file = eval_dir(run_dir, task) / "metrics.json"
    history_file = run_dir / "epoch_eval.json"
    if metrics_file.is_file():
        metrics = read_json(metrics_file)
        metrics["epochs"] = read_json(history_file) if history_file.is_file() else []
        return metrics
    options = dict(
        model=args.model,
        task=task,
        method=method,
        seed=seed,
        train_size=args.train_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        limit=args.limit,
        samples=args.samples,
        rank=args.rank,
        alpha=args.alpha,
        output_dir=str(run_dir),
        overwrite=True,
        logging_steps=20,
    )
    if args.target_modules:
        options["target_modules"] = args.target_modules
    options.update(overrides.get(method, {}))
    config = bl.make_config(**options)
    stochastic = bl.get_method(method).stochastic
    epoch_eval = EpochEval(config, n_samples=0 if stochastic else 1)
    print(f"== {task} {method} seed {seed}", flush=True)
    bl.train(config, progress=False, callbacks=[epoch_eval])
    write_json_atomic(history_file, epoch_eval.history)
    metrics = read_json(metrics_file)
    metrics["epochs"] = epoch_eval.history
    print(
        f"   final (N={metrics['n_samples']}): acc {metrics['accuracy']:.3f} ece {metrics['ece']:.3f} "
        f"nll {metrics['nll']:.3f}",
        flush=True,
    )
    return metrics


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarize(results: list[dict[str, Any]], args) -> str:
    """Markdown: the final table (mean ± std over seeds) and the per-epoch curves."""
    lines = [
        f"# Calibration at small scale ({args.tag})",
        "",
        f"SmolLM2-135M-Instruct (fp32, CPU), cloze scoring (mean log-likelihood), LoRA r={args.rank} "
        f"α={args.alpha} on {' '.join(args.target_modules or ['q_proj', 'v_proj', 'lm_head'])}; "
        f"{args.train_size} training questions, {args.epochs} epochs of batch {args.batch_size}, AdamW lr {args.lr}; "
        f"evaluation on {args.limit} validation questions (fixed seeded subset), N = {args.samples} posterior "
        f"samples for Bayesian methods. Seeds: {' '.join(map(str, args.seeds))}. Method options: "
        f"{json.dumps(args.overrides) if args.overrides else 'defaults'}.",
        "",
        "| task | method | accuracy % | ECE % | NLL | Brier | trainable params | step s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["task"], r["method"]) for r in results}, key=lambda k: (k[0], args.methods.index(k[1])))
    for task, method in keys:
        rows = [r for r in results if r["task"] == task and r["method"] == method]
        lines.append(
            f"| {task} | {method} | {_mean_std([r['accuracy'] for r in rows], 100)} | "
            f"{_mean_std([r['ece'] for r in rows], 100)} | {_mean_std([r['nll'] for r in rows], digits=3)} | "
            f"{_mean_std([r['brier'] for r in rows], digits=3)} | {rows[0].get('trainable_params', 0):,} | "
            f"{_mean_std([r.get('step_time_s', 0) for r in rows], digits=2)} |"
        )
    lines += ["", "Per epoch (LoRA as is; Bayesian methods with their posterior mean), seed-averaged:", ""]
    lines += ["| task | method | epoch | accuracy % | ECE % | NLL |", "|---|---|---|---|---|---|"]
    for task, method in keys:
        rows = [r for r in results if r["task"] == task and r["method"] == method and r.get("epochs")]
        for epoch in sorted({e["epoch"] for r in rows for e in r["epochs"]}):
            points = [e for r in rows for e in r["epochs"] if e["epoch"] == epoch]
            lines.append(
                f"| {task} | {method} | {epoch} | {_mean_std([p['accuracy'] for p in points], 100)} | "
                f"{_mean_std([p['ece'] for p in points], 100)} | {_mean_std([p['nll'] for p in points], digits=3)} |"
            )
    return "\n".join(lines) + "\n"


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``melora:sigma_lr=0.01`` -> ``{"melora": {"sigma_lr": 0.01}}`` (values parsed as JSON when possible)."""
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        method, _, assignment = item.partition(":")
        key, _, value = assignment.partition("=")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        overrides.setdefault(method, {})[key] = parsed
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=["arc-easy", "obqa"])
    parser.add_argument("--methods", nargs="+", default=["lora", "blob", "melora"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--train-size", type=int, default=640)
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--target-modules", nargs="+", default=None)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="Per-method option, e.g. melora:sigma_lr=0.01 (repeatable).",
    )
    parser.add_argument("--tag", default="default")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.overrides = parse_overrides(args.overrides)
    root = args.out / "runs" / args.tag
    started = time.time()
    results = []
    for task in args.tasks:
        for method in args.methods:
            for seed in args.seeds:
                results.append(run_one(task, method, seed, args, args.overrides, root))
                write_json_atomic(
                    args.out / f"{args.tag}.json", {"settings": vars(args) | {"out": str(args.out)}, "results": results}
                )
    table = summarize(results, args)
    write_text_atomic(args.out / f"{args.tag}.md", table)
    print(table)
    print(f"took {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
