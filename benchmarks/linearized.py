"""The linearised predictive against posterior samples, on trained runs (``--posterior-predictive glm|probit``).

For every run given (Me-LoRA or BLoB runs of the calibration benchmark: the posterior in the LM head only, or in
every layer), on the same evaluation questions (the run's task, the calibration benchmark's seeded 300 validation
questions), in one process:

* the predictives: the posterior mean (one pass), N = 10 and N = 100 posterior samples, and the linearised
  predictive with the Monte Carlo (``glm``) and the ``probit`` link;
* accuracy, ECE and NLL of each, and the paired 95 % bootstrap interval of its difference from N = 100 (the
  reference: a predictive is good enough where those intervals hold zero);
* its agreement with N = 100: mean and largest |Δp| over questions and classes, the fraction of questions whose
  predicted class is the same; N = 10's agreement is the Monte Carlo noise a sampled predictive lives with;
* evaluation time relative to the posterior mean's one pass (medians over ``--rounds`` interleaved rounds; on a
  shared machine only the ratios mean something);
* with ``--ood TASK``: the AUROC of telling that task's questions from the in-distribution ones by predictive entropy
  and by mutual information (the linearised predictive's mutual information from its Gaussian draws).

Per-question probabilities are kept in the JSON.

    python benchmarks/linearized.py RUN [RUN ...] [--ood arc-challenge]   # benchmarks/results/linearized.{json,md}
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from _shared import interval_text
from bayeslora.io import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
PREDICTIVES = ("mean", "N=10", "N=100", "glm", "probit")
REFERENCE = "N=100"


def predict_with(run, examples, predictive: str, batch_size: int):
    """The run's prediction of ``examples`` by ``predictive`` (per-sample probabilities kept)."""
    from bayeslora.evaluation.linearized import linearized_predict_batch
    from bayeslora.evaluation.predictive import predict
    from bayeslora.pipeline.common import build_scorer

    scorer = build_scorer(run.task, run.tokenizer, run.config)
    options: dict[str, Any] = {"n_samples": 10}
    if predictive == "mean":
        options = {"n_samples": 0}
    elif predictive.startswith("N="):  # N copies of each question in one pass: keep the tiled rows near batch_size·10
        samples = int(predictive[2:])
        options = {"n_samples": samples}
        batch_size = max(1, batch_size * 10 // samples)
    else:
        options["sampler"] = functools.partial(linearized_predict_batch, link=predictive, n_samples=10)
    return predict(run.model, scorer, examples, batch_size=batch_size, keep_samples=True, progress=False, **options)


def agreement(probs, reference) -> dict[str, float]:
    """Mean and largest |Δp| over questions and classes, and the fraction of questions with the same predicted class."""
    difference = (probs - reference).abs()
    return {
        "mean_abs_diff": float(difference.mean()),
        "max_abs_diff": float(difference.max()),
        "same_class": float((probs.argmax(-1) == reference.argmax(-1)).float().mean()),
    }


def measure_run(run_dir: Path, limit: int, rounds: int, batch_size: int, ood: str | None) -> dict[str, Any]:
    """Every predictive of one run on its evaluation questions (and ``ood``'s), timed in interleaved rounds."""
    from bayeslora.evaluation.evaluate import eval_examples
    from bayeslora.evaluation.metrics import classification_metrics
    from bayeslora.evaluation.significance import paired_bootstrap
    from bayeslora.evaluation.uncertainty import ood_auroc, uncertainty
    from bayeslora.pipeline.common import load_run
    from bayeslora.tasks import load_task

    run = load_run(run_dir, progress=False)
    examples = eval_examples(run.task, limit)
    times: dict[str, list[float]] = {p: [] for p in PREDICTIVES}
    predictions = {}
    for round_index in range(rounds):
        for predictive in PREDICTIVES:
            torch.manual_seed(round_index)
            start = time.perf_counter()
            prediction = predict_with(run, examples, predictive, batch_size)
            times[predictive].append(time.perf_counter() - start)
            predictions.setdefault(predictive, prediction)  # the first round's predictions are reported
    labels = predictions["mean"].labels
    reference = predictions[REFERENCE].probs
    one_pass = statistics.median(times["mean"])
    rows = []
    for predictive in PREDICTIVES:
        probs = predictions[predictive].probs
        row: dict[str, Any] = {
            "predictive": predictive,
            **classification_metrics(probs, labels),
            "time_s": statistics.median(times[predictive]),
            "all_times_s": times[predictive],
            "time_vs_one_pass": statistics.median(times[predictive]) / one_pass,
            **agreement(probs, reference),
            "vs_reference": {
                metric: paired_bootstrap(probs, reference, labels, metric).to_dict() for metric in ("ece", "nll")
            },
            "probs": [[round(float(p), 5) for p in question] for question in probs],
        }
        rows.append(row)
    result: dict[str, Any] = {
        "run": str(run_dir),
        "method": run.config.method,
        "bayesian_layers": run.config.bayesian_layers,
        "task": run.task.name,
        "n_questions": len(examples),
        "labels": labels.tolist(),
        "rows": rows,
    }
    if ood and ood != run.task.name:
        outside_examples = eval_examples(load_task(ood), limit)
        inside_uncertainty = {p: uncertainty(predictions[p].probs, predictions[p].sample_probs) for p in PREDICTIVES}
        result["ood"] = {"task": ood, "n_questions": len(outside_examples)}
        for row in rows:
            predictive = row["predictive"]
            torch.manual_seed(0)
            outside = predict_with(run, outside_examples, predictive, batch_size)
            outside_uncertainty = uncertainty(outside.probs, outside.sample_probs)
            row["ood_auroc"] = {
                key: ood_auroc(inside_uncertainty[predictive][key], outside_uncertainty[key])
                for key in ("entropy", "mutual_information")
            }
    return result


def markdown(results: list[dict[str, Any]]) -> str:
    """One table per run."""
    lines = ["# The linearised predictive against posterior samples", ""]
    for result in results:
        ood = result.get("ood", {}).get("task")
        lines += [
            f"## {result['task']}: {result['method']}, posterior in `{result['bayesian_layers']}` "
            f"({result['n_questions']} questions)",
            "",
            "| predictive | acc % | ECE % | NLL | ΔNLL vs N=100 [95 %] | mean / max abs Δp vs N=100 | same class | "
            "time vs one pass |" + (f" AUROC {ood} entropy / MI |" if ood else ""),
            "|---|---|---|---|---|---|---|---|" + ("---|" if ood else ""),
        ]
        for row in result["rows"]:
            nll = row["vs_reference"]["nll"]
            cells = [
                row["predictive"],
                f"{100 * row['accuracy']:.1f}",
                f"{100 * row['ece']:.1f}",
                f"{row['nll']:.3f}",
                interval_text(nll),
                f"{row['mean_abs_diff']:.4f} / {row['max_abs_diff']:.3f}",
                f"{100 * row['same_class']:.1f} %",
                f"{row['time_vs_one_pass']:.2f}x",
            ]
            if ood:
                auroc = row["ood_auroc"]
                cells.append(f"{auroc['entropy']:.3f} / {auroc['mutual_information']:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="Run directories of a variational method.")
    parser.add_argument("--limit", type=int, default=300, help="Evaluation questions (the seeded subsample).")
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved timing rounds.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ood", default=None, help="An out-of-distribution task for the AUROC columns.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results = []
    for run_dir in args.runs:
        results.append(measure_run(run_dir, args.limit, args.rounds, args.batch_size, args.ood))
        args.out.mkdir(parents=True, exist_ok=True)
        settings = {key: [str(v) for v in value] if key == "runs" else value for key, value in vars(args).items()}
        settings["out"] = str(args.out)
        write_json_atomic(args.out / "linearized.json", {"settings": settings, "results": results})
        write_text_atomic(args.out / "linearized.md", markdown(results))
        print(markdown(results[-1:]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
