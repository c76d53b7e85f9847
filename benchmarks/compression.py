"""Compression: what B-LoRA's learned ranks and bit-widths save, at what accuracy, against LoRA and AdaLoRA.

Every (model, task, variant, seed) is a real ``bayeslora.train`` run, on tasks where the 16-bit LoRA learns
something (it beats the majority class by at least 5 points; every table shows the majority-class row, and the
target table checks it): MiniLM-L6 on SST-2 (sequence classification; the GLUE validation split divided 70/30, of
whose 610 training sentences 480 train and 130 are held out) and SmolLM2-135M on ARC-Easy and OBQA (cloze
scoring; 320 training questions, 200 held out). MRPC and RTE are no longer here: MiniLM predicted the majority
class on them whatever the method, and compressing an adapter that learned nothing measures nothing. Nor is BoolQ:
SmolLM2's cloze LoRA reached 60.3 % on 300 validation questions against the majority class's 61.7 % (58.5 % on the
held-out ones). Variants by default:

* ``lora``: PEFT's LoRA, rank 8, the 16-bit reference;
* ``adalora``: PEFT's AdaLoRA, ranks pruned from 12 to an average of 8 (the same final budget; its bit
  operations are counted against the rank-8 LoRA's), at a 10x larger learning rate: its singular values
  start at 0 and its factors at N(0, 0.02²), so at the shared learning rate it does not move in a few
  hundred steps (SST-2: 56% accuracy at 5e-4, 82% at 5e-3);
* ``blora``: B-LoRA with its defaults (rank and bit-width gates on A, B, e; penalty on expected bit operations):
  gates that can travel 8 times the distance to switch-off in the run's length (``--gate-travel``) under a budget of
  0.25x the bit operations (``--gate-budget``: the penalty's weight learned, multiplied up while the expected cost is
  over the budget and down within it). That default was chosen here, on the held-out questions (means over the
  seeds each variant shares with LoRA), among it and ``blora-t2``, ``blora-t4``, ``blora-t8``, ``blora-t2-l01``,
  ``blora-l01`` (a fixed penalty weight, ``--gate-lambda`` 0.05, 0.01 in the last two, with travel 2, 4, the
  default until then, or 8) and ``blora-t4-b25`` (travel 4 under the budget). The rule: among those at ≤ 0.3x
  LoRA's adapter bit operations with held-out accuracy within one standard error of LoRA's on every task, the most
  accurate on them;
* ``blora-core``: B-LoRA on Me-LoRA's Gaussian core (calibrated and compressed; N posterior samples);
* ``blora-base``: B-LoRA that also quantizes the frozen weights and input activations.

For each run: accuracy, ECE, NLL on the evaluation questions and on the held-out ones; bit operations per token of
the adapter path and in total against the 16-bit LoRA of the same rank on a 16-bit base (convention in
:mod:`bayeslora.reporting.bops`); mean learned rank and bits; and for B-LoRA runs the size of the packed export
against the 16-bit LoRA adapter file.

    python benchmarks/compression.py --seeds 1 2 3 --tag gates --tabulate   # results/compression/gates.md from
                                                      # the committed records (without --tabulate: trains what is
                                                      # missing); every default variant on every suite
    python benchmarks/compression.py --suites minilm --seeds 1 --tag quick

(``results/compression/default.md`` is the table of 2026-12-04, made before the tasks, the selection rule and
B-LoRA's default changed; its variant names are that day's.)

Writes ``benchmarks/results/compression/<tag>.json`` and ``<tag>.md``; runs go to
``benchmarks/results/compression/runs/<tag>/`` (not committed), each finished run's record also to
``benchmarks/results/compression/records/<tag>/`` (committed; see ``calibration.py``). Finished runs are reused;
a stopped run continues from its last end-of-epoch checkpoint; ``--tabulate`` makes the tables from the runs
finished so far, training nothing.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _shared import (
    TABULATE_HELP,
    RecordStore,
    Variant,
    finished_or_stored,
    finished_record,
    mean_std,
    parse_variant,
    prepare_run,
    run_benchmark,
    run_directory,
    with_heldout,
)

RESULTS = Path(__file__).resolve().parent / "results" / "compression"
DEFAULT_VARIANTS = (
    "lora",
    "adalora=adalora:lr=0.005",
    "blora",
    "blora-t2=blora:gate_travel=2,gate_budget=null",
    "blora-t4=blora:gate_travel=4,gate_budget=null",
    "blora-t8=blora:gate_travel=8,gate_budget=null",
    "blora-t2-l01=blora:gate_travel=2,gate_lambda=0.01,gate_budget=null",
    "blora-l01=blora:gate_travel=4,gate_lambda=0.01,gate_budget=null",
    "blora-t4-b25=blora:gate_travel=4,gate_budget=0.25",
    "blora-core=blora:bayesian_core=true",
    "blora-base=blora:quantize_base=true",
)

#: The B-LoRA variants the default is chosen among (on held-out questions, see the module docstring); ``--select``
#: names others.
SELECTED_FAMILY = ("blora-t2", "blora-t4", "blora-t8", "blora-t2-l01", "blora-l01", "blora-t4-b25", "blora")

#: Per model: the tasks, the training recipe of every variant (method options come on top) and how many held-out
#: training examples (after the training subset) every run is also evaluated on.
SUITES: dict[str, dict[str, Any]] = {
    "minilm": {
        "model": "minilm-l6",
        "tasks": ["sst2"],
        "recipe": {"train_size": 480, "epochs": 8, "batch_size": 16, "lr": 5e-4, "eval_batch_size": 32},
        "heldout": 130,
    },
    "smollm2": {
        "model": "smollm2-135m",
        "tasks": ["arc-easy", "obqa"],
        "recipe": {"train_size": 320, "epochs": 3, "batch_size": 4, "lr": 5e-4, "limit": 300},
        "heldout": 200,
    },
}


def run_options(suite: str, task: str, variant: Variant, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    """The ``bayeslora.make_config`` options of the run of (suite, task, variant, seed)."""
    spec = SUITES[suite]
    return {
        **spec["recipe"],
        "model": spec["model"],
        "task": task,
        "method": variant.method,
        "seed": seed,
        "rank": settings["rank"],
        "logging_steps": 20,
        **variant.options,
    }


def stored_or_finished(suite: str, task: str, variant: Variant, seed: int, settings: dict[str, Any]) -> tuple:
    """(label, record or None) of a configuration for ``--tabulate``: its run's record, else the stored one."""
    options = run_options(suite, task, variant, seed, settings)
    return finished_or_stored(settings, task, variant, seed, options, needs=["heldout"])


def run_one(suite: str, task: str, variant: Variant, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    """Train + evaluate one configuration (and export B-LoRA), or reuse its finished record."""
    import bayeslora as bl
    from bayeslora.evaluation import load_predictions
    from bayeslora.io import read_json, write_json_atomic
    from bayeslora.runs import eval_dir

    spec = SUITES[suite]
    run_dir = run_directory(settings["root"], task, variant, seed)
    record_file = run_dir / "benchmark.json"
    held = {"heldout_eval": spec["heldout"]}
    options = run_options(suite, task, variant, seed, settings)
    store = RecordStore(Path(settings["store"]))
    if (record := finished_record(run_dir, variant, options=options)) is not None:
        record = with_heldout(record, run_dir, held)
        store.save(run_dir, record, options)
        return record
    if (record := store.load(run_dir, variant, options, needs=["heldout"])) is not None:
        print(f"== {task} {variant.name} seed {seed}: its record in {store.directory}", flush=True)
        return record
    started = time.time()
    print(f"== {task} {variant.name} seed {seed}: started", flush=True)
    _, config, callbacks = prepare_run(options, run_dir)
    if config is not None:
        bl.train(config, progress=False, callbacks=callbacks)
    metrics = read_json(eval_dir(run_dir, task) / "metrics.json")
    labels = load_predictions(eval_dir(run_dir, task)).labels
    bops = metrics.get("bops", {})
    structure = metrics.get("structure", {})
    record: dict[str, Any] = {
        "suite": suite,
        "model": spec["model"],
        "task": task,
        "variant": variant.name,
        "method": variant.method,
        "options": variant.options,
        "seed": seed,
        **{key: metrics[key] for key in ("accuracy", "ece", "nll", "brier", "n_samples", "n_examples")},
        "majority_accuracy": float(labels.bincount().max()) / len(labels),
        "adapter_bops_ratio": bops.get("adapter_ratio"),
        "total_bops_ratio": bops.get("total_ratio"),
        "mean_rank": statistics.mean(layer["rank"] for layer in structure.values()) if structure else None,
        "mean_bits": {
            name: statistics.mean(layer["bits"][name] for layer in structure.values())
            for name in (next(iter(structure.values()))["bits"] if structure else {})
        },
        **{key: metrics.get(key) for key in ("trainable_params", "step_time_s", "steps")},
    }
    if variant.method == "blora" and not variant.options.get("quantize_base"):
        exported = bl.export(run_dir, "packed", run_dir / "export-packed", progress=False)
        record["packed_bytes"] = exported["bytes"]
        record["lora16_bytes"] = exported["reference_16bit_lora_bytes"]
        record["packed_ratio"] = exported["ratio"]
    record["wall_time_min"] = round((time.time() - started) / 60, 1)
    write_json_atomic(record_file, record)
    record = with_heldout(record, run_dir, held)
    store.save(run_dir, record, options)
    print(
        f"== {task} {variant.name} seed {seed}: acc {record['accuracy']:.3f} adapter BOPs "
        f"{record['adapter_bops_ratio']}x ({record['wall_time_min']} min)",
        flush=True,
    )
    return record


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in rows if row.get(key) is not None]
    return statistics.mean(values) if values else None


def standard_error(accuracy: float, n: int) -> float:
    """The standard error of an accuracy measured on ``n`` questions, √(p(1 − p)/n)."""
    return math.sqrt(accuracy * (1 - accuracy) / n)


def target_checks(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task, whether the 16-bit LoRA learns it (≥ 5 points over the majority class), and per B-LoRA variant
    on an unquantized base the targets on seed means: adapter-path BOPs ≤ 0.3x the 16-bit LoRA's at accuracy
    within one standard error of LoRA's (at the evaluation's size); the packed export at least 3x smaller than the
    16-bit LoRA file."""
    checks = []
    for task in sorted({r["task"] for r in results}):
        of_task = [r for r in results if r["task"] == task]
        lora = [r for r in of_task if r["variant"] == "lora"]
        if not lora:
            continue
        lora_accuracy = _mean(lora, "accuracy")
        over_majority = 100 * (lora_accuracy - _mean(lora, "majority_accuracy"))
        one_se = 100 * standard_error(lora_accuracy, lora[0]["n_examples"])
        blora = [r for r in of_task if r["method"] == "blora" and not r["options"].get("quantize_base")]
        for variant in dict.fromkeys(r["variant"] for r in blora):
            rows = [r for r in blora if r["variant"] == variant]
            ratio = _mean(rows, "adapter_bops_ratio")
            gap = 100 * (_mean(rows, "accuracy") - lora_accuracy)
            packed = _mean(rows, "packed_ratio")
            checks.append(
                {
                    "task": task,
                    "variant": variant,
                    "lora_minus_majority_points": over_majority,
                    "lora_beats_majority_by_5": over_majority >= 5.0,
                    "blora_adapter_bops_ratio": ratio,
                    "bops_at_most_0.3": ratio <= 0.3,
                    "blora_minus_lora_acc_points": gap,
                    "one_se_points": one_se,
                    "acc_within_one_se": gap >= -one_se,
                    "packed_vs_lora16": packed,
                    "packed_3x_smaller": packed is not None and packed <= 1 / 3,
                }
            )
    return checks


def gate_selection(
    results: list[dict[str, Any]], family: tuple[str, ...] = SELECTED_FAMILY
) -> tuple[str | None, list[dict[str, Any]]]:
    """The B-LoRA default chosen on held-out questions among ``family``: per variant and task its adapter BOPs and
    held-out accuracy against LoRA's, each the mean over the seeds that variant shares with LoRA (the table lists
    them; variants with more seeds are judged on more evidence; the same held-out questions, so the seeds average
    the training noise, not the questions'; one standard error is the binomial one of a single run's accuracy,
    √(p(1 − p)/n) at LoRA's mean p and the held-out size n); the variant chosen is, among those at ≤ 0.3x the BOPs with
    held-out accuracy within one standard error of LoRA's on every task, the most accurate on held-out questions
    (the targets are constraints; what a user then gives up is accuracy), else the one meeting both on most tasks,
    then the most accurate. Returns ``(chosen, rows)``."""
    held = [r for r in results if "heldout" in r]
    lora = {(r["task"], r["seed"]): r["heldout"] for r in held if r["variant"] == "lora"}
    tasks = sorted({task for task, _ in lora})
    rows, scores = [], {}
    for variant in family:
        runs = {(r["task"], r["seed"]): r for r in held if r["variant"] == variant and (r["task"], r["seed"]) in lora}
        if not runs or {task for task, _ in runs} != set(tasks):
            continue
        met, gaps = 0, []
        for task in tasks:
            seeds = sorted(seed for t, seed in runs if t == task)
            accuracy = statistics.mean(runs[task, s]["heldout"]["accuracy"] for s in seeds)
            reference = statistics.mean(lora[task, s]["accuracy"] for s in seeds)
            bops = statistics.mean(runs[task, s]["adapter_bops_ratio"] for s in seeds)
            one_se = standard_error(reference, lora[task, seeds[0]]["n_examples"])
            gap = accuracy - reference
            ok = bops <= 0.3 and gap >= -one_se
            met += ok
            gaps.append(gap)
            rows.append(
                {
                    "variant": variant,
                    "task": task,
                    "seeds": seeds,
                    "adapter_bops_ratio": bops,
                    "heldout_accuracy": accuracy,
                    "lora_heldout_accuracy": reference,
                    "one_se": one_se,
                    "meets": ok,
                }
            )
        scores[variant] = (met, statistics.mean(gaps))
    chosen = max(scores, key=scores.get) if scores else None
    return chosen, rows


def _cell(rows: list[dict[str, Any]], key: str, scale: float = 1.0, digits: int = 1) -> str:
    values = [row[key] for row in rows if row.get(key) is not None]
    return mean_std(values, scale, digits) if values else "–"


def summarize(results: list[dict[str, Any]], settings: dict[str, Any], variants: list[Variant]) -> str:
    """Markdown: one table (mean ± std over seeds) and the targets."""
    order = {v.name: i for i, v in enumerate(variants)}
    keys = sorted({(r["suite"], r["task"], r["variant"]) for r in results}, key=lambda k: (k[0], k[1], order[k[2]]))
    described = "; ".join(f"`{v.name}` = {v.method} {v.options or '(defaults)'}" for v in variants)
    recipes = "; ".join(
        f"{spec['model']}: {', '.join(f'{k} {v}' for k, v in spec['recipe'].items())}"
        for name, spec in SUITES.items()
        if name in settings["suites"]
    )
    lines = [
        f"# Compression: learned rank and bit-width ({settings['tag']})",
        "",
        f"Rank {settings['rank']}, default targets per model; {recipes}. Seeds: "
        f"{' '.join(map(str, settings['seeds']))}. Variants: {described}. Bit operations per token of the adapted "
        "linear layers (MACs × weight bits × activation bits; unquantized activations and weights count as "
        "16-bit), against the 16-bit LoRA of the same rank on a 16-bit base; packed = the B-LoRA packed export "
        "against the 16-bit LoRA adapter file.",
        "",
        "| model | task | variant | N | accuracy % | ECE % | NLL | adapter BOPs | total BOPs | mean rank "
        "| mean bits | packed / LoRA16 file | step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    shown: set[tuple[str, str]] = set()
    for suite, task, name in keys:
        rows = [r for r in results if (r["suite"], r["task"], r["variant"]) == (suite, task, name)]
        if (suite, task) not in shown and rows[0].get("majority_accuracy") is not None:
            shown.add((suite, task))
            majority = 100 * rows[0]["majority_accuracy"]
            lines.append(f"| {rows[0]['model']} | {task} | majority class | – | {majority:.1f} |" + " – |" * 8)
        bits = rows[0].get("mean_bits") or {}
        bit_cell = " ".join(f"{t}{statistics.mean(r['mean_bits'][t] for r in rows):.1f}" for t in bits) or "–"
        lines.append(
            f"| {rows[0]['model']} | {task} | {name} | {rows[0]['n_samples']} | {_cell(rows, 'accuracy', 100)} | "
            f"{_cell(rows, 'ece', 100)} | {_cell(rows, 'nll', digits=3)} | "
            f"{_cell(rows, 'adapter_bops_ratio', digits=3)} | "
            f"{_cell(rows, 'total_bops_ratio', digits=3)} | {_cell(rows, 'mean_rank', digits=2)} | {bit_cell} | "
            f"{_cell(rows, 'packed_ratio', digits=3)} | {_cell(rows, 'step_time_s', digits=2)} |"
        )
    checks = target_checks(results)
    if checks:
        lines += [
            "",
            "Targets for every B-LoRA variant on an unquantized base (seed means; one standard error of LoRA's "
            "accuracy at the evaluation's size):",
            "",
            "| task | LoRA − majority (≥ 5 pts) | variant | adapter BOPs vs LoRA16 (≤ 0.3) | accuracy − LoRA's "
            "(≥ −1 SE) | packed vs LoRA16 file (≤ 1/3) |",
            "|---|---|---|---|---|---|",
        ]
        for c in checks:
            packed = "–" if c["packed_vs_lora16"] is None else f"{c['packed_vs_lora16']:.3f}"
            lines.append(
                f"| {c['task']} | {c['lora_minus_majority_points']:+.1f} "
                f"{'✓' if c['lora_beats_majority_by_5'] else '✗'} | {c['variant']} | "
                f"{c['blora_adapter_bops_ratio']:.3f} {'✓' if c['bops_at_most_0.3'] else '✗'} | "
                f"{c['blora_minus_lora_acc_points']:+.1f} (SE {c['one_se_points']:.1f}) "
                f"{'✓' if c['acc_within_one_se'] else '✗'} | {packed} {'✓' if c['packed_3x_smaller'] else '✗'} |"
            )
    family = tuple(settings.get("select") or SELECTED_FAMILY)
    chosen, selection = gate_selection(results, family)
    if selection:
        lines += [
            "",
            f"The B-LoRA default, chosen on held-out training questions (means over the seeds the variant and LoRA "
            f"both have) among {', '.join(family)}: **{chosen}** (≤ 0.3x BOPs and held-out accuracy within one SE "
            "of LoRA's on every task, then the highest held-out accuracy):",
            "",
            "| variant | task | seeds | adapter BOPs | held-out accuracy % | LoRA's % | 1 SE | meets both |",
            "|---|---|---|---|---|---|---|---|",
            *(
                f"| {r['variant']} | {r['task']} | {' '.join(map(str, r['seeds']))} | {r['adapter_bops_ratio']:.3f} | "
                f"{100 * r['heldout_accuracy']:.1f} | {100 * r['lora_heldout_accuracy']:.1f} | {100 * r['one_se']:.1f} "
                f"| {'✓' if r['meets'] else '✗'} |"
                for r in selection
            ),
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suites", nargs="+", default=list(SUITES), choices=list(SUITES))
    parser.add_argument("--tasks", nargs="+", default=None, help="Only these tasks of the chosen suites.")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(DEFAULT_VARIANTS),
        help="Methods, or name=method:key=value,... for a method with other options.",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument(
        "--select",
        nargs="+",
        default=list(SELECTED_FAMILY),
        help="The B-LoRA variants the default is chosen among, on held-out questions.",
    )
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=1, help="Runs at a time (each with cores / jobs threads).")
    parser.add_argument("--tabulate", action="store_true", help=TABULATE_HELP)
    parser.add_argument("--tag", default="default")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    variants = [parse_variant(v) for v in args.variants]
    settings = {k: v for k, v in vars(args).items() if k not in ("variants", "out", "tabulate")}
    settings["root"] = str(args.out / "runs" / args.tag)
    settings["store"] = str(args.out / "records" / args.tag)
    settings["variants"] = [vars(v) for v in variants]
    configurations = [
        (suite, task, variant, seed, settings)
        for suite in args.suites
        for task in SUITES[suite]["tasks"]
        if args.tasks is None or task in args.tasks
        for variant in variants
        for seed in args.seeds
    ]

    run_benchmark(
        run_one,
        configurations,
        jobs=args.jobs,
        out=args.out,
        tag=args.tag,
        settings=settings,
        summarize=lambda results: summarize(results, settings, variants),
        target_checks=target_checks,
        finished=stored_or_finished if args.tabulate else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
