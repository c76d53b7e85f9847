"""Posterior samples at the price of one pass: how much of the model carries the posterior (``--bayesian-layers``).

Part 1, cost (``--timing``, minutes): on the packaged SmolLM2-135M (cloze scoring, ARC-Easy, Me-LoRA at rank 8 on
q_proj, v_proj and lm_head, the base in ``--dtype auto``'s precision), for the posterior in the LM head only
(``last:0``), in the top 1, 2, 4, 8 blocks and the head, and everywhere (``all``): the time of evaluating a batch of
16 validation questions with 10 posterior samples, relative to one deterministic pass (the posterior mean), with
the deterministic blocks run once for all samples (the shared trunk) and, for comparison, tiled like the rest; and
the linearised predictive (``--posterior-predictive probit``: one pass and one backward pass per class); and the
time of a training step (8 questions, AdamW). Each setting runs in its own fresh process per round (one model per
process: a process holding all six had its timings spread 2-3x by page faults), taking the median of 3 timings of
each measure after a warm-up; the settings are interleaved over the rounds and the table gives medians over them.

Part 2, quality (``--quality``): reads the calibration benchmark's runs of the same variants (trained with
``benchmarks/calibration.py --tag sampling``, the command is printed; the posterior in every layer is the evidence
benchmark's default Me-LoRA, :data:`EVERY_LAYER`) and tabulates accuracy, ECE and NLL in and out of distribution,
the held-out NLL the choice of K is made on, and each K's paired intervals against every layer.

Part 3, at prediction only (``--prediction-only RUN...``): runs trained with the posterior in every layer, each
evaluated again with ``--sample-layers last:K`` for every K (the posterior mean below the top K blocks: the cost of
a ``last:K`` run, no retraining) on the questions of its own evaluation, with the same number of samples; accuracy,
ECE and NLL, and each one's paired 95 % bootstrap interval against sampling every layer.

    python benchmarks/sampling.py --timing            # benchmarks/results/sampling.{json,md}
    python benchmarks/sampling.py --timing --quick    # 2 rounds
    python benchmarks/sampling.py --quality           # adds the quality table (after the calibration runs)
    python benchmarks/sampling.py --prediction-only RUN [RUN ...]   # adds the prediction-only table
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _shared import (
    LOSSY_CELL,
    evaluation_complete,
    in_fresh_process,
    interval_text,
    lossy_probabilities,
    stale_defaults,
)
from bayeslora.io import read_json, write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["q_proj", "v_proj", "lm_head"]
SPECS = ("last:0", "last:1", "last:2", "last:4", "last:8", "all")
SAMPLES = 10
EVAL_QUESTIONS = 16
TRAIN_QUESTIONS = 8


def label(spec: str) -> str:
    """The table's name of a ``bayesian_layers`` value."""
    if spec in ("last:0", "all"):
        return {"last:0": "lm_head only", "all": "all blocks"}[spec]
    return f"top {spec.split(':')[1]} + lm_head"


def variant_name(spec: str) -> str:
    """The calibration benchmark's variant of a ``bayesian_layers`` value."""
    return "melora-" + spec.replace(":", "")


MEASURES = ("one pass", "shared trunk", "tiled", "linearised", "train step")


def measure_setting(spec: str, repeats: int) -> dict[str, float]:
    """Median seconds of every :data:`MEASURES` for Me-LoRA with ``bayesian_layers=spec``, in this process (called
    in a fresh subprocess: one model per process, so that no other setting's tensors share its allocator)."""
    import torch
    from peft import get_peft_model

    import bayeslora as bl
    from bayeslora.evaluation.linearized import linearized_predict_batch
    from bayeslora.tasks import DATA_SEED, seeded_subset

    task = bl.load_task("arc-easy")
    torch.manual_seed(0)
    model, tokenizer = bl.load_model("smollm2-135m", progress=False)
    model = get_peft_model(model, bl.MeLoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, bayesian_layers=spec))
    scorer = bl.make_scorer(task, tokenizer, "cloze")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    train = scorer.collate(seeded_subset(task.split("train"), TRAIN_QUESTIONS, DATA_SEED))
    evaluation = scorer.collate(seeded_subset(task.split("eval"), EVAL_QUESTIONS, DATA_SEED))

    def step() -> None:
        model.train()
        logits = scorer.class_logits(model, train)
        torch.nn.functional.cross_entropy(logits, train["labels"]).backward()
        optimizer.step()
        optimizer.zero_grad()

    runs = {
        "one pass": lambda: bl.predict_batch(model.eval(), scorer, evaluation, n_samples=0),
        "shared trunk": lambda: bl.predict_batch(model.eval(), scorer, evaluation, n_samples=SAMPLES),
        "tiled": lambda: bl.predict_batch(model.eval(), scorer, evaluation, n_samples=SAMPLES, share_trunk=False),
        "linearised": lambda: linearized_predict_batch(model.eval(), scorer, evaluation, link="probit"),
        "train step": step,
    }
    times: dict[str, list[float]] = {measure: [] for measure in MEASURES}
    for repeat in range(repeats + 1):  # repeat 0 warms up (allocator, optimizer state) and is not kept
        for measure in MEASURES:
            started = time.perf_counter()
            runs[measure]()
            if repeat:
                times[measure].append(time.perf_counter() - started)
    dtype = str(next(p.dtype for p in model.parameters() if not p.requires_grad)).replace("torch.", "")
    return {"base_dtype": dtype, **{measure: statistics.median(seconds) for measure, seconds in times.items()}}


def run_setting(spec: str, repeats: int) -> dict[str, float]:
    """:func:`measure_setting` in a fresh Python process."""
    return in_fresh_process("sampling", "measure_setting", spec, repeats)


def timings(rounds: int, repeats: int = 3) -> dict[str, Any]:
    """Evaluation and training-step times of Me-LoRA for every :data:`SPECS`: each setting in its own process per
    round (the median of ``repeats`` timings of each measure), the settings interleaved over ``rounds``."""
    times: dict[tuple[str, str], list[float]] = {}
    dtype = None
    for round_ in range(rounds):
        for spec in SPECS:
            measured = run_setting(spec, repeats)
            dtype = measured.pop("base_dtype")
            for measure, seconds in measured.items():
                times.setdefault((spec, measure), []).append(seconds)
            shown = ", ".join(f"{m} {s:.2f} s" for m, s in measured.items())
            print(f"round {round_ + 1} {spec}: {shown}", flush=True)
    rows = []
    reference_step = statistics.median(times[("all", "train step")])
    for spec in SPECS:
        medians = {measure: statistics.median(times[(spec, measure)]) for measure in MEASURES}
        rows.append(
            {
                "bayesian_layers": spec,
                "median_s": medians,
                "all_s": {measure: times[(spec, measure)] for measure in MEASURES},
                "shared_vs_one_pass": medians["shared trunk"] / medians["one pass"],
                "tiled_vs_one_pass": medians["tiled"] / medians["one pass"],
                "linearised_vs_one_pass": medians["linearised"] / medians["one pass"],
                "step_vs_all": medians["train step"] / reference_step,
            }
        )
    return {"rounds": rounds, "base_dtype": dtype, "samples": SAMPLES, "eval_questions": EVAL_QUESTIONS, "rows": rows}


#: The calibration benchmark's run with the posterior in every layer: the evidence benchmark's Me-LoRA with the
#: default recipe (free factors, σ learning rate 0.05, what `bayesian_layers: all` resolves to), not run twice.
EVERY_LAYER = ("evidence", "melora-free-slr0.05")


def _records(root: Path, store: Path, pattern: str) -> dict[str, Path]:
    """``{run name: record file}`` of the runs matching ``pattern``: the stored records, replaced by the run's own
    ``benchmark.json`` where the run is on this machine."""
    records = {path.stem: path for path in store.glob(pattern + ".json")}
    records.update(
        {run.name: run / "benchmark.json" for run in root.glob(pattern) if (run / "benchmark.json").is_file()}
    )
    return records


def quality(
    root: Path, store: Path, tasks: list[str], every_layer: tuple[Path, Path, str] | None = None
) -> list[dict[str, Any]]:
    """Accuracy, ECE and NLL (in distribution, on the held-out training questions the choice is made on, and on
    each OOD task) of the calibration benchmark's runs under ``root``, or of their records in the record store
    ``store`` for runs that are not on this machine; for ``all`` the runs of ``every_layer`` = (root, store,
    variant) if given. Each row with per-question predictions also has its paired 95 % bootstrap intervals
    against the run of the same task and seed with the posterior in every layer (``minus_all``), but for the NLL
    where a side's kept probabilities do not reproduce its recorded NLL (an old 6-decimal record)."""
    import torch

    from bayeslora.evaluation.significance import compare

    rows = []
    for task in tasks:
        for spec in SPECS:
            where = (root, store, variant_name(spec)) if spec != "all" or every_layer is None else every_layer
            records = _records(where[0], where[1], f"{task}-{where[2]}-seed*")
            for name in sorted(records):
                record = read_json(records[name])
                if changed := stale_defaults(record):  # the calibration benchmark would train it again
                    print(
                        f"{records[name]}: made with other defaults than the code has now ({'; '.join(changed)}): "
                        "not used",
                        flush=True,
                    )
                    continue
                final = record["final"]
                row = {
                    "task": task,
                    "bayesian_layers": spec,
                    "seed": record["seed"],
                    "accuracy": final["accuracy"],
                    "ece": final["ece"],
                    "nll": final["nll"],
                    "heldout": {k: record["heldout"][k] for k in ("accuracy", "ece", "nll")}
                    if "heldout" in record
                    else None,
                    "eval_time_s": record.get("eval_time_s"),
                    "step_time_s": record.get("step_time_s"),
                    "ood": {
                        name: {
                            k: ood[k] for k in ("accuracy", "ece", "nll", "auroc_entropy", "auroc_mutual_information")
                        }
                        for name, ood in (record.get("ood") or {}).items()
                    },
                    "predictions": record.get("predictions"),
                }
                if kept := row["predictions"]:
                    probs = torch.tensor(kept["probs"], dtype=torch.float64)
                    row["lossy"] = lossy_probabilities(
                        kept.get("format"), probs, torch.tensor(kept["labels"]), final["nll"]
                    )
                rows.append(row)
    everywhere = {(r["task"], r["seed"]): r for r in rows if r["bayesian_layers"] == "all"}
    for row in rows:  # against the posterior in every layer, question by question
        theirs = everywhere.get((row["task"], row["seed"]))
        if row["predictions"] and theirs and theirs["predictions"]:
            mine = row["predictions"]
            if mine["labels"] != theirs["predictions"]["labels"]:
                raise RuntimeError(f"{row['task']} seed {row['seed']}: {row['bayesian_layers']} and all were evaluated "
                                   "on other questions")  # fmt: skip
            differences = compare(
                torch.tensor(mine["probs"]), torch.tensor(theirs["predictions"]["probs"]), torch.tensor(mine["labels"])
            )
            row["minus_all"] = {metric: d.to_dict() for metric, d in differences.items()}
            if row["lossy"] or theirs["lossy"]:  # the per-question NLL of a side is not known
                del row["minus_all"]["nll"]
    for row in rows:
        del row["predictions"]
        row.pop("lossy", None)
    return rows


def prediction_only(runs: list[Path], evaluations: Path) -> list[dict[str, Any]]:
    """Each run (posterior in every layer) evaluated with ``--sample-layers`` at every K of :data:`SPECS` (into
    ``evaluations/<run>/<K>/``; an evaluation already there is reused) on the questions and with the samples of its
    own evaluation of its training task, and out of distribution on the tasks that evaluation was (the AUROCs of
    telling them apart); compared with that evaluation (K = all) question by question."""
    import bayeslora as bl
    from bayeslora.evaluation import load_predictions
    from bayeslora.evaluation.significance import calibrated_ece_floor, compare
    from bayeslora.runs import eval_dir, read_run_config

    rows = []
    for run in runs:
        task = read_run_config(run)["task"]
        everywhere_dir = eval_dir(run, task)
        everywhere, reference = read_json(everywhere_dir / "metrics.json"), load_predictions(everywhere_dir)
        if (
            everywhere.get("sample_layers", "all") != "all"
            or read_run_config(run).get("bayesian_layers", "all") != "all"
        ):
            raise ValueError(f"{run}: --prediction-only needs a run with its posterior in every layer")
        ood_tasks = sorted(everywhere.get("ood", {}))
        floor = calibrated_ece_floor(reference.probs)
        for spec in SPECS:
            if spec == "all":
                metrics, prediction = everywhere, reference
            else:
                target = evaluations / run.name / spec.replace(":", "")
                made = eval_dir(target, task) / "metrics.json"
                as_asked = {"sample_layers": spec, "n_samples": everywhere["n_samples"], "limit": everywhere["limit"]}
                if not evaluation_complete(eval_dir(target, task), ood_tasks) or any(
                    read_json(made).get(key) != value for key, value in as_asked.items()
                ):
                    bl.evaluate(run, sample_layers=spec, samples=everywhere["n_samples"], limit=everywhere["limit"],
                                ood_tasks=ood_tasks, output_dir=target, overwrite=True, progress=False)  # fmt: skip
                metrics, prediction = (
                    read_json(eval_dir(target, task) / "metrics.json"),
                    load_predictions(eval_dir(target, task)),
                )
            if not bool((prediction.labels == reference.labels).all()):
                raise RuntimeError(f"{run}: the evaluation with {spec} holds other questions than the run's own")
            differences = compare(prediction.probs, reference.probs, reference.labels)
            rows.append(
                {
                    "run": str(run),
                    "task": task,
                    "sample_layers": spec,
                    "n_examples": int(reference.labels.shape[0]),
                    "n_samples": metrics["n_samples"],
                    **{key: metrics[key] for key in ("accuracy", "ece", "nll", "brier")},
                    "minus_all": {name: d.to_dict() for name, d in differences.items()},
                    "ood": {name: metrics["ood"][name] for name in ood_tasks},
                    "ece_floor": {"mean": floor[0], "std": floor[1]},
                }
            )
            print(f"{run.name} {spec}: acc {metrics['accuracy']:.3f} ece {metrics['ece']:.3f} nll {metrics['nll']:.3f}")
    return rows


def prediction_only_section(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: the prediction-only table (see :func:`prediction_only`)."""
    lines = [
        "",
        "At prediction only (`--sample-layers last:K` on a run trained with the posterior in every layer: the "
        "posterior mean below the top K blocks, the cost of the row above with the same K), against sampling every "
        "layer on the same questions; paired 95 % bootstrap intervals (a difference is real only where its interval "
        "excludes 0); the ECE a perfectly calibrated model shows on these questions as the floor:",
        "",
        "| task | run | samples from | N | accuracy % | ECE % | NLL | Δ accuracy (pts) | Δ ECE (pts) | Δ NLL | "
        "calibrated ECE % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        d = row["minus_all"]
        same = row["sample_layers"] == "all"
        lines.append(
            f"| {row['task']} | {Path(row['run']).name} | {label(row['sample_layers'])} | {row['n_samples']} | "
            f"{100 * row['accuracy']:.1f} | {100 * row['ece']:.1f} | {row['nll']:.3f} | "
            f"{'–' if same else interval_text(d['accuracy'], 100, 1)} | "
            f"{'–' if same else interval_text(d['ece'], 100, 1)} | {'–' if same else interval_text(d['nll'])} | "
            f"{100 * row['ece_floor']['mean']:.1f} ± {100 * row['ece_floor']['std']:.1f} |"
        )
    ood_rows = [row for row in rows if row.get("ood")]
    if ood_rows:
        lines += [
            "",
            "Telling each out-of-distribution task's questions from the training task's by the predictive's "
            "uncertainty (AUROC by entropy / by mutual information; 0.5 = chance):",
            "",
            "| task | run | samples from | " + " | ".join(sorted(ood_rows[0]["ood"])) + " |",
            "|---|---|---|" + "---|" * len(ood_rows[0]["ood"]),
        ]
        for row in ood_rows:
            aurocs = " | ".join(
                f"{o['auroc_entropy']:.3f} / {o['auroc_mutual_information']:.3f}" for _, o in sorted(row["ood"].items())
            )
            lines.append(f"| {row['task']} | {Path(row['run']).name} | {label(row['sample_layers'])} | {aurocs} |")
    return lines


def markdown(
    timing: dict[str, Any], quality_rows: list[dict[str, Any]], prediction_rows: list[dict[str, Any]] = ()
) -> str:
    lines = [
        "# Where the posterior lives: cost and calibration (SmolLM2-135M, Me-LoRA r = 8 on q, v, lm_head)",
        "",
        f"Evaluation of {timing['eval_questions']} ARC-Easy questions (cloze) with {timing['samples']} posterior "
        f"samples, relative to one deterministic pass of the same model; base in {timing['base_dtype']}; medians of "
        f"{timing['rounds']} interleaved rounds. *Shared trunk*: the deterministic blocks below the posterior run once "
        "for all samples; *tiled*: every block runs on the batch tiled 10 times. Training step: 8 questions, AdamW, "
        "relative to the posterior in every block. *Linearised*: `--posterior-predictive probit`, one pass at the "
        "posterior mean and one backward pass per class.",
        "",
        "| posterior in | one pass | N = 10, shared trunk | N = 10, tiled | linearised | training step |",
        "|---|---|---|---|---|---|",
    ]
    for row in timing["rows"]:
        m = row["median_s"]
        linearised = f"{m['linearised']:.2f} s ({row['linearised_vs_one_pass']:.2f}x)" if "linearised" in m else "–"
        lines.append(
            f"| {label(row['bayesian_layers'])} | {m['one pass']:.2f} s | {m['shared trunk']:.2f} s "
            f"({row['shared_vs_one_pass']:.2f}x) | {m['tiled']:.2f} s ({row['tiled_vs_one_pass']:.2f}x) | "
            f"{linearised} | {m['train step']:.2f} s ({row['step_vs_all']:.2f}x) |"
        )
    if quality_rows:
        lines += [
            "",
            "Trained with the posterior where it is sampled (`--bayesian-layers`; `benchmarks/calibration.py --tag "
            f"sampling`, all blocks: the evidence benchmark's `{EVERY_LAYER[1]}`), 300 validation questions, N = 10; "
            "held-out: the 200 training questions after each run's subset, what a choice is made on; Δ: against the "
            "posterior in every layer on the same questions, paired 95 % bootstrap interval (real only where it "
            "excludes 0); OOD: trained on OBQA, evaluated on the other tasks:",
            "",
            "| task | posterior in | seed | held-out NLL | accuracy % | ECE % | NLL | Δ accuracy (pts) | Δ ECE (pts) "
            "| Δ NLL | OOD accuracy / ECE / NLL / AUROC (MI) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in quality_rows:
            ood = "; ".join(
                f"{name} {100 * o['accuracy']:.1f} / {100 * o['ece']:.1f} / {o['nll']:.3f} / "
                f"{o['auroc_mutual_information']:.3f}"
                for name, o in row["ood"].items()
            )
            d = row.get("minus_all") if row["bayesian_layers"] != "all" else None
            deltas = (
                f"{interval_text(d['accuracy'], 100, 1)} | {interval_text(d['ece'], 100, 1)} | "
                f"{interval_text(d['nll']) if 'nll' in d else LOSSY_CELL}"
                if d
                else "– | – | –"
            )
            heldout = f"{row['heldout']['nll']:.3f}" if row.get("heldout") else "–"
            lines.append(
                f"| {row['task']} | {label(row['bayesian_layers'])} | {row['seed']} | {heldout} | "
                f"{100 * row['accuracy']:.1f} | {100 * row['ece']:.1f} | {row['nll']:.3f} | {deltas} | {ood or '-'} |"
            )
    if prediction_rows:
        lines += prediction_only_section(list(prediction_rows))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timing", action="store_true", help="Measure the cost (part 1).")
    parser.add_argument("--quality", action="store_true", help="Tabulate the calibration runs (part 2).")
    parser.add_argument(
        "--prediction-only",
        nargs="+",
        type=Path,
        default=[],
        metavar="RUN",
        help="Runs with the posterior in every layer, evaluated with --sample-layers last:K for every K (part 3).",
    )
    parser.add_argument("--quick", action="store_true", help="2 timing rounds.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="Timings of each measure per process.")
    parser.add_argument("--tasks", nargs="+", default=["arc-easy", "obqa"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    json_file = args.out / "sampling.json"
    result = read_json(json_file) if json_file.is_file() else {}
    if args.timing:
        result["timing"] = timings(2 if args.quick else args.rounds, args.repeats)
    if args.quality:
        variants = " ".join(f"{variant_name(s)}=melora:bayesian_layers={s}" for s in SPECS if s != "all")
        print(
            "the runs: python benchmarks/calibration.py --tag sampling --tasks arc-easy obqa --seeds 1 "
            "--heldout-eval 200 --ood-tasks obqa=arc-challenge,arc-easy,mmlu:college_chemistry,mmlu:college_physics "
            f"--variants {variants} (all: the evidence benchmark's {EVERY_LAYER[1]})"
        )
        calibration = args.out / "calibration"
        tag, every_layer = EVERY_LAYER
        result["quality"] = quality(
            calibration / "runs" / "sampling",
            calibration / "records" / "sampling",
            args.tasks,
            every_layer=(calibration / "runs" / tag, calibration / "records" / tag, every_layer),
        )
    if args.prediction_only:
        evaluations = args.out / "calibration" / "runs" / "sampling-prediction-only"
        result["prediction_only"] = prediction_only(args.prediction_only, evaluations)
    if "timing" not in result:
        parser.error("no timing yet: run with --timing first")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(json_file, result)
    text = markdown(result["timing"], result.get("quality", []), result.get("prediction_only", []))
    write_text_atomic(args.out / "sampling.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
