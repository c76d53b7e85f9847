"""Calibration at small scale: the BLoB protocol shrunk to SmolLM2-135M on 2 CPU cores.

Every (task, variant, seed) is a real ``bayeslora.train`` run (cloze scoring) on a fixed seeded subset of
the training split, evaluated on a fixed seeded subset of the validation split. A *variant* is a method
with options (``melora-naive=melora:sigma_lr=0.0005``), so that ablations sit in the same table as the
methods. For each run the benchmark records:

* the final metrics with N posterior samples (the method's prediction), and for Bayesian methods also
  with the posterior mean (N = 0) and as a function of N (1, 2, 5, 10: from the saved per-sample
  probabilities, no extra passes);
* after every epoch, the metrics of the current model (LoRA as is, Bayesian methods with their
  posterior mean, an ensemble its members after the same epoch combined) and the mean posterior σ, to show
  calibration moving as the adapter over-fits;
* a temperature-scaled row per variant ("+ TS"): one temperature fitted on ``--ts-heldout`` held-out
  training questions the run never saw (``bayeslora calibrate``), applied to its evaluation.

The baselines of the literature are variants like any other, and in the recorded configuration: MAP, MC
dropout, Laplace-LoRA with its prior precision chosen on held-out training questions (what ``--method
laplace`` does by default here) and by the marginal likelihood, and a 3-member ensemble. Laplace is fitted
post hoc to the LoRA run of the same seed when that has finished. Cost here, per run of the default recipe:
~70 min of training with one thread each for two at a time (an ensemble 3x), evaluation 2-30 min (N = 10
samples for Bayesian methods), a held-out Laplace prior ~40 min more.

Finished runs are reused (each writes ``benchmark.json`` last), so the script can be stopped and
restarted: a run it was training continues from its last end-of-epoch checkpoint, one that had finished
training is only evaluated. ``--jobs 2`` trains two configurations at a time with one thread each;
``--tabulate`` trains nothing and makes the tables from the runs finished so far.

    python benchmarks/calibration.py                                    # the recorded configuration
    python benchmarks/calibration.py --tasks arc-easy --seeds 1 --epochs 2 --tag quick
    python benchmarks/calibration.py --variants lora melora melora-naive=melora:sigma_lr=0.0005
    python benchmarks/calibration.py --tabulate                         # tables of what has finished

Writes ``benchmarks/results/calibration/<tag>.json`` and ``<tag>.md``; runs go to
``benchmarks/results/calibration/runs/<tag>/`` (not committed), and each finished run's record (everything the
tables use, per-question predictions included) also to ``benchmarks/results/calibration/records/<tag>/``, which is
committed: on another machine, or after the runs were deleted, a stored record stands for its run when the run
would be made the same way now, so a benchmark longer than one machine's life continues where the last commit
left it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _shared import (
    LOSSY_CELL,
    OPTIONS_FILE,
    PREDICTION_FORMAT,
    TABULATE_HELP,
    RecordStore,
    Variant,
    finished_or_stored,
    finished_record,
    lossy_probabilities,
    mean_std,
    metrics_row,
    parse_variant,
    prepare_run,
    run_benchmark,
    run_directory,
    with_heldout,
)

RESULTS = Path(__file__).resolve().parent / "results" / "calibration"
DEFAULT_VARIANTS = (
    "lora",
    "blob",
    "melora",
    "map",
    "mcdropout",
    "laplace-heldout=laplace:laplace_prior=heldout",
    "laplace-marglik=laplace:laplace_prior=marglik",
    "ensemble",
)
SAMPLE_COUNTS = (1, 2, 5, 10)
DEFAULT_TARGETS = ("q_proj", "v_proj", "lm_head")


EPOCHS_FILE = "benchmark_epochs.json"


def _epoch_callback(config, n_samples: int, every: int = 1, keep: bool = False):
    """A TrainerCallback that evaluates the model at the end of every ``every``-th epoch (and the last) and
    records its posterior σ, in ``history`` and in the run's ``benchmark_epochs.json`` (with ``keep``, a
    resumed run, the records already there are kept; an epoch evaluated again replaces its record).

    An ensemble's members train one after the other, each with this callback: each record then names its
    member and keeps the member's probabilities, from which :func:`ensemble_epochs` makes the ensemble's."""
    from transformers import TrainerCallback

    import bayeslora as bl
    from bayeslora.evaluation import eval_examples, evaluate_model
    from bayeslora.io import read_json, write_json_atomic
    from bayeslora.methods import get_method
    from bayeslora.methods.variational import bayesian_tuner, posterior_std_mean

    history_file = config.resolved_output_dir() / EPOCHS_FILE
    members = get_method(config.method).members(config)

    class EpochEval(TrainerCallback):
        def __init__(self) -> None:
            self.history: list[dict[str, Any]] = read_json(history_file) if keep and history_file.is_file() else []
            task = bl.load_task(config.task)
            self.examples = eval_examples(task, config.limit)
            self.scorer = bl.build_scorer(task, bl.load_tokenizer(config.model), config)

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            epoch = round(state.epoch)
            if epoch % every and state.global_step < state.max_steps:
                return
            metrics, prediction = evaluate_model(model, self.scorer, self.examples, n_samples=n_samples, progress=False)
            model.train()
            record = {"epoch": epoch, "step": state.global_step, **metrics_row(metrics)}
            if bayesian_tuner(model) is not None:
                record["sigma_mean"] = posterior_std_mean(model)
            key = {"epoch": epoch}
            if members:  # the member being trained checkpoints into checkpoints/<member>
                key["member"] = Path(args.output_dir).name
                assert key["member"] in members, f"{args.output_dir} is not an ensemble member's checkpoint folder"
                record.update(member=key["member"], probs=prediction.probs.tolist(), labels=prediction.labels.tolist())

            def same(r: dict[str, Any]) -> bool:
                return all(r.get(k) == v for k, v in key.items())

            self.history = sorted(
                [*(r for r in self.history if not same(r)), record], key=lambda r: (r["epoch"], r.get("member", ""))
            )
            write_json_atomic(history_file, self.history)
            print(f"   {config.task} {config.method} seed {config.seed}: {json.dumps(record)}", flush=True)

    return EpochEval()


def ensemble_epochs(history: list[dict[str, Any]], size: int, combine: str) -> list[dict[str, Any]]:
    """The ensemble's metrics after each epoch, from its members' records (:func:`_epoch_callback`): at an epoch
    that all ``size`` members reached, their probabilities combined as the ensemble predicts (``combine``:
    ``probs`` averages them, ``logits`` takes the softmax of the mean log-probabilities, which equals that of
    the mean class scores). Records without a member (from before members were recorded) are left out."""
    import torch

    from bayeslora.evaluation.metrics import classification_metrics

    combined = []
    for epoch in sorted({r["epoch"] for r in history if "member" in r}):
        records = [r for r in history if r.get("member") is not None and r["epoch"] == epoch]
        if len(records) < size:
            continue
        probs = torch.tensor([r["probs"] for r in records])  # (K, N, C)
        probs = probs.mean(0) if combine == "probs" else probs.log().mean(0).softmax(-1)  # (N, C)
        metrics = classification_metrics(probs, torch.tensor(records[0]["labels"]))
        combined.append({"epoch": epoch, "step": records[0]["step"], "members": size, **metrics_row(metrics)})
    return combined


def _with_temperature(record: dict[str, Any], run_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The record with its temperature-scaled rows (``bayeslora calibrate``: one T fitted on held-out training
    questions the run never saw, applied to its evaluation and to every out-of-distribution one), computed once
    and stored in the run's ``benchmark.json`` with the rescaled per-question probabilities."""
    import bayeslora as bl
    from bayeslora.io import write_json_atomic

    heldout = settings.get("ts_heldout", 0)
    if not heldout or "ts" in record:
        return record
    scaled = {r["task"]: r for r in bl.calibrate(run_dir, heldout=heldout, overwrite=True, progress=False)}
    own = scaled[record["task"]]
    record = {**record, "ts": {**metrics_row(own), "temperature": own["temperature"]}}
    for ood_task, ood in record.get("ood", {}).items():
        ood["ts"] = metrics_row(scaled[ood_task])
    _add_scaled_predictions(record, run_dir)
    write_json_atomic(run_dir / "benchmark.json", record)
    return record


def _add_scaled_predictions(record: dict[str, Any], run_dir: Path) -> None:
    """Put the temperature-scaled per-question probabilities of the run's evaluations (``eval/<task>-ts/``, on its
    task and on every out-of-distribution one) in ``record["predictions"]``."""
    from bayeslora.evaluation import load_predictions
    from bayeslora.pipeline.calibrate import TS_SUFFIX
    from bayeslora.runs import eval_dir

    def scaled(task: str) -> list[list[float]]:
        folder = eval_dir(run_dir, task)
        return _rounded(load_predictions(folder.with_name(folder.name + TS_SUFFIX)).probs)

    predictions = record.setdefault("predictions", {})
    predictions["ts"] = scaled(record["task"])
    for ood_task in record.get("ood", {}):
        predictions.setdefault("ood", {}).setdefault(ood_task, {})["ts"] = scaled(ood_task)


def _with_exact_predictions(record: dict[str, Any], run_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The record with its per-question probabilities read again from its run's evaluations if it kept them in an
    older, lossy format (6 decimals: every probability below 5e-7 became 0, so that an NLL recomputed from them was
    that of the smallest float64, and the small ones that stayed were off by up to half their value), written back
    to the run's ``benchmark.json``."""
    from bayeslora.io import write_json_atomic

    if "predictions" not in record or record["predictions"].get("format") == PREDICTION_FORMAT:
        return record
    record = {**record, "predictions": _evaluation_records(run_dir, record["task"], settings)["predictions"]}
    if "ts" in record:
        _add_scaled_predictions(record, run_dir)
    write_json_atomic(run_dir / "benchmark.json", record)
    return record


#: Methods whose adapters can carry a posterior: a record of theirs keeps its width (``bayeslora posterior``).
POSTERIOR_METHODS = ("melora", "blob", "blora")


def _with_posterior_width(record: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The record with its run's posterior width per module kind (``bayeslora posterior``: the median over the
    kind's Bayesian layers of the noise against the mean update and against W0, σ / |M|, mean σ), computed once
    and stored in the run's ``benchmark.json``; none for a method without a posterior."""
    from bayeslora.io import write_json_atomic
    from bayeslora.pipeline.common import load_run
    from bayeslora.reporting.posterior import posterior_widths, summarize_widths

    if "posterior_width" in record or record.get("method") not in POSTERIOR_METHODS:
        return record
    if record["method"] == "blora" and not record.get("options", {}).get("bayesian_core"):
        return record  # B-LoRA's deterministic core has no posterior
    loaded = load_run(run_dir, progress=False)
    record = {**record, "posterior_width": summarize_widths(posterior_widths(loaded.model))}
    write_json_atomic(run_dir / "benchmark.json", record)
    return record


def _rounded(probs) -> list[list[float]]:
    """Per-question probabilities as lists, each to 6 significant digits (what the results file keeps): a
    relative error below 5e-6, so an NLL recomputed from them is within about 5e-6 nats of the evaluation's
    however small the probability of the answer."""
    return [[float(f"{p:.6g}") for p in row] for row in probs.tolist()]


def _scored_members(results: list[dict[str, Any]], members: list[str], task: str) -> list[tuple]:
    """(held-out NLL, variant, held-out accuracy, held-out ECE) of each of ``members`` on ``task`` (seed 1)."""
    return [
        (r["heldout"]["nll"], r["variant"], r["heldout"]["accuracy"], r["heldout"]["ece"])
        for r in results
        if r["task"] == task and r["variant"] in members and r["seed"] == 1 and "heldout" in r
    ]


def parse_families(families: list[str]) -> list[tuple[str, list[str]]]:
    """``[(family name, [variant, ...])]`` of ``--select``'s ``name=variant,variant,...`` specs."""
    return [(name, members.split(",")) for name, _, members in (family.partition("=") for family in families)]


def family_choices(results: list[dict[str, Any]], families: list[str]) -> dict[tuple[str, str], str]:
    """``{(task, family name): chosen variant}``: of each family ``name=variant,variant,...`` the variant with the
    lowest held-out NLL at seed 1, the seed the choice is made on (only the chosen one is run at other seeds)."""
    choices = {}
    for name, members in parse_families(families):
        for task in sorted({r["task"] for r in results}):
            if scored := _scored_members(results, members, task):
                choices[task, name] = min(scored)[1]
    return choices


def selection_section(results: list[dict[str, Any]], families: list[str]) -> list[str]:
    """Markdown: for each family ``name=variant,variant,...`` and task, the held-out NLL of each of its variants
    (seed 1: the seed the choice is made on) and the one chosen (lowest), never looking at the evaluation set."""
    lines = []
    choices = family_choices(results, families)
    for name, members in parse_families(families):
        for task in sorted({r["task"] for r in results}):
            scored = _scored_members(results, members, task)
            if not scored:
                continue
            best = choices[task, name]
            # with seed 1 of some members still to come, the choice so far may change
            mark = " **chosen**" if len(scored) == len(members) else f" (best so far: {len(scored)} of {len(members)})"
            for nll, variant, acc, ece in sorted(scored, key=lambda s: members.index(s[1])):
                chosen = mark if variant == best else ""
                lines.append(f"| {task} | {name} | {variant}{chosen} | {nll:.3f} | {100 * acc:.1f} | {100 * ece:.1f} |")
    if not lines:
        return []
    return [
        "",
        "Hyperparameters chosen on held-out training questions (the 200 after each run's training subset; seed 1), "
        "never on the evaluation questions: the variant of each family with the lowest held-out NLL:",
        "",
        "| task | family | variant | held-out NLL | held-out accuracy % | held-out ECE % |",
        "|---|---|---|---|---|---|",
        *lines,
    ]


def _family_of(settings: dict[str, Any]) -> dict[str, str]:
    """``{variant name: family name}`` of the ``--select`` families."""
    return {v: name for name, members in parse_families(settings["select"]) for v in members}


def without_unchosen_seeds(configurations: list[tuple], settings: dict[str, Any]) -> list[tuple]:
    """``(task, variant, seed)`` configurations without the other seeds of the family members that seed 1 did not
    choose (they are never run at them; a table would list them as missing forever)."""
    seed_one = [
        stored_or_finished(t, v, 1, settings)[1]
        for t, v in {(t, v.name): (t, v) for t, v, _ in configurations}.values()
    ]
    choices = family_choices([r for r in seed_one if r is not None], settings["select"])
    members = _family_of(settings)
    return [
        (task, variant, seed)
        for task, variant, seed in configurations
        if seed == 1 or variant.name not in members or choices.get((task, members[variant.name])) == variant.name
    ]


def unfinished_choices(configurations: list[tuple], settings: dict[str, Any]) -> list[str]:
    """The seed-1 runs a choice still waits for: ``task variant`` of every member of a ``--select`` family whose
    other seeds are asked for in ``configurations`` and which has no finished seed-1 record with its held-out
    evaluation (a choice made before all of them are in could pick another member)."""
    members = _family_of(settings)
    asked = {(task, members[v.name]) for task, v, seed in configurations if seed != 1 and v.name in members}
    variants = {v.name: v for _, v, _ in configurations}
    return [
        f"{task} {name}"
        for task, family in sorted(asked)
        for name, member in members.items()
        if member == family
        and (
            name not in variants
            or (record := stored_or_finished(task, variants[name], 1, settings)[1]) is None
            or "heldout" not in record
        )
    ]


def _evaluation_records(run_dir: Path, task: str, settings: dict[str, Any]) -> dict[str, Any]:
    """What a finished run's evaluations add to its record: selective prediction on its task; per
    out-of-distribution task its metrics and the AUROCs of telling it apart; every per-question prediction."""
    from bayeslora.evaluation import load_predictions
    from bayeslora.io import read_json
    from bayeslora.runs import eval_dir

    final = read_json(eval_dir(run_dir, task) / "metrics.json")
    own = load_predictions(eval_dir(run_dir, task))
    predictions: dict[str, Any] = {
        "format": PREDICTION_FORMAT,
        "probs": _rounded(own.probs),
        "labels": own.labels.tolist(),
    }
    added: dict[str, Any] = {
        "selective": {key: final.get(key) for key in ("aurc", "accuracy_at_coverage")},
        "uncertainty": {key: final.get(key) for key in ("mean_entropy", "mean_mutual_information")},
    }
    ood = {}
    for ood_task, scores in final.get("ood", {}).items():
        metrics = read_json(eval_dir(run_dir, ood_task) / "metrics.json")
        ood[ood_task] = {**metrics_row(metrics), **scores}
        prediction = load_predictions(eval_dir(run_dir, ood_task))
        predictions.setdefault("ood", {})[ood_task] = {
            "probs": _rounded(prediction.probs),
            "labels": prediction.labels.tolist(),
        }
    if ood:
        added["ood"] = ood
    added["predictions"] = predictions
    return added


def _lora_run_for_laplace(settings: dict[str, Any], task: str, variant: Variant, seed: int) -> Path | None:
    """For Laplace-LoRA, the finished LoRA run of the same task and seed if there is one: the posterior is then
    fitted to it post hoc (``bayeslora laplace``), which gives what training ``--method laplace`` would."""
    from bayeslora.methods.laplace import LAPLACE_OPTIONS

    if variant.method != "laplace" or set(variant.options) - set(LAPLACE_OPTIONS):
        return None
    lora = Variant("lora", "lora", {})
    run_dir = run_directory(settings["root"], task, lora, seed)
    options = run_options(task, lora, seed, settings)
    return run_dir if finished_record(run_dir, lora, options=options) is not None else None


def run_options(task: str, variant: Variant, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    """The ``bayeslora.make_config`` options of the run of (task, variant, seed) under the benchmark's settings."""
    options = dict(
        model=settings["model"],
        task=task,
        method=variant.method,
        seed=seed,
        train_size=settings["train_size"],
        epochs=settings["epochs"],
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        limit=settings["limit"],
        samples=settings["samples"],
        rank=settings["rank"],
        alpha=settings["alpha"],
        logging_steps=20,
    )
    if settings.get("target_modules"):
        options["target_modules"] = settings["target_modules"]
    if ood_tasks := settings.get("ood", {}).get(task):
        options.update(eval_tasks=[task], ood_tasks=list(ood_tasks))
    options.update(variant.options)
    return options


def _store(settings: dict[str, Any]) -> RecordStore:
    return RecordStore(Path(settings["store"]))


def _added_evaluations(settings: dict[str, Any]) -> list[str]:
    """The keys a finished record holds once the evaluations after training are in (held-out, temperature)."""
    return [key for key, size in (("heldout", "heldout_eval"), ("ts", "ts_heldout")) if settings.get(size)]


def stored_or_finished(task: str, variant: Variant, seed: int, settings: dict[str, Any]) -> tuple[str, Any]:
    """(label, record or None) of a configuration for ``--tabulate``: its run's record (with its probabilities read
    again from the run if it kept them lossily, and so stored), else the stored one."""
    options, ood = run_options(task, variant, seed, settings), settings.get("ood", {}).get(task, ())

    def exact(record: dict[str, Any], run_dir: Path) -> dict[str, Any]:
        if (refreshed := _with_exact_predictions(record, run_dir, settings)) is not record:
            _save(run_dir, refreshed, settings, options)
        return refreshed

    return finished_or_stored(settings, task, variant, seed, options, ood, _added_evaluations(settings), exact)


def _save(run_dir: Path, record: dict[str, Any], settings: dict[str, Any], options: dict[str, Any]) -> None:
    """Keep the run's record in the record store, with the options the run was trained with (as it recorded them
    when it had them)."""
    from bayeslora.io import read_json

    recorded = run_dir / OPTIONS_FILE
    _store(settings).save(run_dir, record, read_json(recorded) if recorded.is_file() else options)


def _finish(run_dir: Path, record: dict[str, Any], settings: dict[str, Any], options: dict[str, Any]) -> dict:
    """The record with its held-out and temperature-scaled evaluations, also kept in the record store."""
    record = _with_exact_predictions(record, run_dir, settings)
    record = _with_temperature(with_heldout(record, run_dir, settings), run_dir, settings)
    record = _with_posterior_width(record, run_dir)
    _save(run_dir, record, settings, options)
    return record


def run_one(task: str, variant: Variant, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    """Train + evaluate one configuration, or reuse its finished record (its run's, else the one in the record
    store); returns the record."""
    import bayeslora as bl
    from bayeslora.evaluation import load_predictions
    from bayeslora.evaluation.metrics import classification_metrics
    from bayeslora.io import read_json, write_json_atomic
    from bayeslora.methods import get_method
    from bayeslora.runs import eval_dir

    run_dir = run_directory(settings["root"], task, variant, seed)
    record_file = run_dir / "benchmark.json"
    ood_tasks = settings.get("ood", {}).get(task, ())
    options = run_options(task, variant, seed, settings)
    if (record := finished_record(run_dir, variant, ood_tasks, options)) is not None:
        return _finish(run_dir, record, settings, options)
    if (
        record := _store(settings).load(run_dir, variant, options, ood_tasks, _added_evaluations(settings))
    ) is not None:
        print(f"== {task} {variant.name} seed {seed}: its record in {_store(settings).directory}", flush=True)
        return record
    started = time.time()
    print(f"== {task} {variant.name} seed {seed}: started", flush=True)
    stochastic = bl.get_method(variant.method).is_stochastic(bl.make_config(**options))
    if (lora_run := _lora_run_for_laplace(settings, task, variant, seed)) is not None:
        print(f"   {task} {variant.name} seed {seed}: the posterior fitted post hoc to {lora_run}", flush=True)
        laplace_options = {k: v for k, v in variant.options.items() if k != "samples"}
        bl.laplace(
            lora_run, output_dir=run_dir, overwrite=True, progress=False, samples=options["samples"], **laplace_options
        )
        # the recipe it stands for, as a trained run records it (a finished run is reused only with its recipe)
        write_json_atomic(run_dir / OPTIONS_FILE, json.loads(json.dumps({**options, "output_dir": str(run_dir)})))
        history = read_json(lora_run / "benchmark.json")["epochs"]  # the posterior's mode is that LoRA
    else:
        state, config, callbacks = prepare_run(options, run_dir)
        if config is not None:
            epochs = _epoch_callback(
                config, n_samples=0 if stochastic else 1, every=settings.get("eval_every", 1), keep=state == "resumed"
            )
            bl.train(config, progress=False, callbacks=[epochs, *callbacks])
        history = read_json(run_dir / EPOCHS_FILE) if (run_dir / EPOCHS_FILE).is_file() else []
        run_config = bl.make_config(**options)
        if members := get_method(run_config.method).members(run_config):
            history = ensemble_epochs(history, len(members), run_config.ensemble_combine)
    final = read_json(eval_dir(run_dir, task) / "metrics.json")
    record: dict[str, Any] = {
        "task": task,
        "variant": variant.name,
        "method": variant.method,
        "options": variant.options,
        "seed": seed,
        "final": metrics_row(final),
        "n_samples": final["n_samples"],
        "epochs": history,
        **{k: final.get(k) for k in ("trainable_params", "step_time_s", "step_memory_mb", "steps", "eval_time_s")},
        **_evaluation_records(run_dir, task, settings),
        "base_dtype": read_json(run_dir / "train_summary.json").get("base_dtype"),
    }
    summary = read_json(run_dir / "train_summary.json")
    if "early_stopping" in summary:
        record["early_stopping"] = {k: v for k, v in summary["early_stopping"].items() if k != "history"}
    if stochastic:
        mean = bl.evaluate(run_dir, samples=0, output_dir=run_dir / "posterior-mean", overwrite=True, progress=False)
        record["posterior_mean"] = metrics_row(mean)
        prediction = load_predictions(eval_dir(run_dir, task))
        if prediction.sample_probs is not None:
            record["by_samples"] = {
                str(k): metrics_row(classification_metrics(prediction.sample_probs[:k].mean(0), prediction.labels))
                for k in SAMPLE_COUNTS
                if k <= prediction.sample_probs.shape[0]
            }
    record["wall_time_min"] = round((time.time() - started) / 60, 1)
    write_json_atomic(record_file, record)
    record = _finish(run_dir, record, settings, options)
    f = record["final"]
    print(
        f"== {task} {variant.name} seed {seed}: acc {f['accuracy']:.3f} ece {f['ece']:.3f} nll {f['nll']:.3f} "
        f"({record['wall_time_min']} min)",
        flush=True,
    )
    return record


def _cells(rows: list[dict[str, float]]) -> str:
    return (
        f"{mean_std([r['accuracy'] for r in rows], 100)} | {mean_std([r['ece'] for r in rows], 100)} | "
        f"{mean_std([r['nll'] for r in rows], digits=3)} | {mean_std([r['brier'] for r in rows], digits=3)}"
    )


def target_checks(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task, the issue's targets for the variant named ``melora`` against ``lora`` and ``blob``
    (seed means): ECE at most half of LoRA's, within 1 point of BLoB's, accuracy within 1 point of LoRA's."""

    def mean(task: str, variant: str, key: str) -> float | None:
        values = [r["final"][key] for r in results if r["task"] == task and r["variant"] == variant]
        return statistics.mean(values) if values else None

    checks = []
    for task in sorted({r["task"] for r in results}):
        me, lora, blob = (mean(task, v, "ece") for v in ("melora", "lora", "blob"))
        me_acc, lora_acc = mean(task, "melora", "accuracy"), mean(task, "lora", "accuracy")
        if None in (me, lora, blob, me_acc, lora_acc):
            continue
        checks.append(
            {
                "task": task,
                "melora_ece_vs_lora": me / lora,
                "ece_half_of_lora": me <= lora / 2,
                "melora_minus_blob_ece_points": 100 * (me - blob),
                "ece_within_1pt_of_blob": me <= blob + 0.01,
                "melora_minus_lora_acc_points": 100 * (me_acc - lora_acc),
                "acc_within_1pt_of_lora": me_acc >= lora_acc - 0.01,
            }
        )
    return checks


def _probs(result: dict[str, Any], which: str = "probs", ood_task: str | None = None):
    """A result's per-question probabilities (``probs``, or ``ts`` after temperature scaling), on its task or an
    out-of-distribution one; None when the result does not keep them."""
    import torch

    kept = result.get("predictions") or {}
    if ood_task is not None:
        kept = kept.get("ood", {}).get(ood_task, {})
    values = kept.get(which)
    return None if values is None else torch.tensor(values, dtype=torch.float64)


def _labels(result: dict[str, Any], ood_task: str | None = None):
    """A result's per-question answers on its task or an out-of-distribution one."""
    import torch

    kept = result["predictions"]
    return torch.tensor((kept if ood_task is None else kept["ood"][ood_task])["labels"])


def _lossy(result: dict[str, Any], which: str, ood_task: str | None) -> bool:
    """Whether a result's kept probabilities miss its evaluation's NLL by more than 1e-3 nats (a record kept in
    the old 6-decimal format with answers of probability below 5e-7): its per-question NLL is not known."""
    kept_format = (result.get("predictions") or {}).get("format")
    if kept_format == PREDICTION_FORMAT:  # exact: nothing to check (nor a recorded NLL needed)
        return False
    if ood_task is None:
        recorded = (result["ts"] if which == "ts" else result["final"])["nll"]
    else:
        recorded = (result["ood"][ood_task]["ts"] if which == "ts" else result["ood"][ood_task])["nll"]
    return lossy_probabilities(kept_format, _probs(result, which, ood_task), _labels(result, ood_task), recorded)


def _side(results: list[dict[str, Any]], task: str, name: str, ood_task: str | None = None) -> dict[int, Any]:
    """Seed -> the run of a pair's side, ``variant`` or ``variant+ts`` (temperature-scaled), that keeps its
    probabilities on ``ood_task`` (default: the training task): ``(probs, labels, lossy)``."""
    variant, _, scaled = name.partition("+")
    which = "ts" if scaled else "probs"
    return {
        r["seed"]: (probs, _labels(r, ood_task), _lossy(r, which, ood_task))
        for r in results
        if r["task"] == task and r["variant"] == variant and (probs := _probs(r, which, ood_task)) is not None
    }


def _pair_row(task: str, ood_task: str | None, a_name: str, b_name: str, a: dict, b: dict) -> str | None:
    """One row of the paired differences (None without a seed both sides have): the NLL's cell is left out where
    a side's kept probabilities do not reproduce its NLL."""
    import torch

    from bayeslora.evaluation.significance import paired_bootstrap_seeds

    seeds = sorted(s for s in a if s in b)
    if not seeds:
        return None
    if differing := [s for s in seeds for side in (a, b) if not torch.equal(side[s][1], a[seeds[0]][1])]:
        raise ValueError(
            f"{task} {ood_task or ''}: {a_name} − {b_name}: seed(s) {sorted(set(differing))} were evaluated on other "
            "questions than the rest: a paired difference needs the same questions (evaluate all with the same "
            "--eval-size)"
        )
    cells = []
    for metric, scale, digits in (("accuracy", 100, 1), ("ece", 100, 1), ("nll", 1, 3)):
        if metric == "nll" and any(a[s][2] or b[s][2] for s in seeds):
            cells.append(LOSSY_CELL)
            continue
        d = paired_bootstrap_seeds([a[s][0] for s in seeds], [b[s][0] for s in seeds], a[seeds[0]][1], metric)
        mark = " **" if d.excludes_zero else ""
        cells.append(
            f"{scale * d.difference:+.{digits}f} [{scale * d.low:+.{digits}f}, {scale * d.high:+.{digits}f}]{mark}"
        )
    where = task if ood_task is None else f"{task} → {ood_task}"
    return f"| {where} | {a_name} − {b_name} | {' '.join(map(str, seeds))} | " + " | ".join(cells) + " |"


def intervals_section(results: list[dict[str, Any]], pairs: list[str], families: Sequence[str] = ()) -> list[str]:
    """Markdown: for each task and pair ``a:b``, the seed mean of a − b of accuracy, ECE and NLL with its 95 %
    paired-bootstrap interval over the questions (resampled once for all seeds), on the seeds both have; then the
    same on every out-of-distribution task both sides were evaluated on (trained on the task, evaluated there).
    A side named after one of the ``--select`` ``families`` is the variant chosen for the task."""
    choices, members = family_choices(results, list(families)), dict(parse_families(list(families)))

    def chosen(task: str, name: str) -> tuple[str, str]:
        """(variant name, its label in the table) of a pair's side."""
        variant, plus, scaled = name.partition("+")
        if (task, variant) not in choices:
            return name, name
        scored, size = len(_scored_members(results, members[variant], task)), len(members[variant])
        name = choices[task, variant] + plus + scaled
        return name, name + (f" (best so far: {scored} of {size})" if scored < size else "")

    lines = []
    for task in sorted({r["task"] for r in results}):
        ood_tasks = sorted(
            {t for r in results if r["task"] == task for t in (r.get("predictions") or {}).get("ood", {})}
        )
        for ood_task in [None, *ood_tasks]:
            for pair in pairs:
                (a_name, a_label), (b_name, b_label) = (chosen(task, name) for name in pair.split(":", 1))
                a, b = _side(results, task, a_name, ood_task), _side(results, task, b_name, ood_task)
                if (row := _pair_row(task, ood_task, a_label, b_label, a, b)) is not None:
                    lines.append(row)
    if not lines:
        return []
    return [
        "",
        "Paired differences, seed means, with 95 % bootstrap intervals over the questions (resampled once for all "
        "seeds); ** where the interval excludes 0, the only differences to read as real. `task → other`: trained on "
        "the task, evaluated on the other (+ts: with the temperature fitted on the training task's held-out "
        "questions):",
        "",
        "| task | difference | seeds | accuracy (pts) | ECE (pts) | NLL |",
        "|---|---|---|---|---|---|",
        *lines,
    ]


def floor_cell(rows: list[dict[str, Any]]) -> str:
    """The ECE (%) a perfectly calibrated model with these rows' predictions shows on as many questions (mean over
    the seeds' floors)."""
    from bayeslora.evaluation.significance import calibrated_ece_floor

    floors = [calibrated_ece_floor(probs, draws=300)[0] for r in rows if (probs := _probs(r)) is not None]
    return mean_std(floors, 100) if floors else "–"


def ood_section(results: list[dict[str, Any]], keys: list[tuple[str, str]]) -> list[str]:
    """Markdown: per training task, variant and out-of-distribution task, seed means of its accuracy, ECE, NLL
    (and after the training task's temperature), and the AUROC of telling it apart by entropy and by mutual
    information."""
    lines = []
    for task, name in keys:
        rows = [r for r in results if (r["task"], r["variant"]) == (task, name) and r.get("ood")]
        for ood_task in sorted({t for r in rows for t in r["ood"]}):
            points = [r["ood"][ood_task] for r in rows if ood_task in r["ood"]]
            scaled = [p["ts"] for p in points if "ts" in p]
            ts = (
                f"{mean_std([p['ece'] for p in scaled], 100)} / {mean_std([p['nll'] for p in scaled], digits=3)}"
                if scaled
                else "–"
            )
            lines.append(
                f"| {task} | {name} | {ood_task} | {mean_std([p['accuracy'] for p in points], 100)} | "
                f"{mean_std([p['ece'] for p in points], 100)} | {mean_std([p['nll'] for p in points], digits=3)} | "
                f"{ts} | {mean_std([p['auroc_entropy'] for p in points], digits=3)} | "
                f"{mean_std([p['auroc_mutual_information'] for p in points], digits=3)} |"
            )
    if not lines:
        return []
    return [
        "",
        "Out of distribution (seed means): the runs trained on the task evaluated on others; + TS with the temperature "
        "fitted on the training task's held-out questions; AUROC of telling the other task's questions from the "
        "training task's by predictive entropy and by mutual information (0.5: no better than chance):",
        "",
        "| trained on | variant | evaluated on | accuracy % | ECE % | NLL | + TS: ECE % / NLL | AUROC entropy | "
        "AUROC MI |",
        "|---|---|---|---|---|---|---|---|---|",
        *lines,
    ]


def posterior_width_section(results: list[dict[str, Any]], keys: list[tuple[str, str]]) -> list[str]:
    """Markdown: per task, variant and module kind the posterior width of its runs (seed means of the median over
    the kind's layers), measured on ΔW so that no rescaling of the factors changes it."""
    lines = []
    for task, name in keys:
        rows = [r for r in results if (r["task"], r["variant"]) == (task, name) and r.get("posterior_width")]
        for module in dict.fromkeys(w["module"] for r in rows for w in r["posterior_width"]):
            widths = [w for r in rows for w in r["posterior_width"] if w["module"] == module]

            def cell(key: str, widths: list[dict[str, Any]] = widths) -> str:
                values = [w[key] for w in widths if w.get(key) is not None]
                return mean_std(values, digits=3) if values else "–"

            lines.append(
                f"| {task} | {name} | {module} | {widths[0]['layers']} | {cell('noise_to_mean')} | "
                f"{cell('noise_to_base')} | {cell('sigma_to_mean')} | {cell('sigma_mean')} |"
            )
    if not lines:
        return []
    return [
        "",
        "Posterior width (`bayeslora posterior`; per module kind the median over its Bayesian layers, seed means): the "
        "noise √E‖ΔW − E ΔW‖²_F against the mean update ‖E ΔW‖_F and against ‖W0‖_F, and σ / |M| per random entry:",
        "",
        "| task | variant | module | layers | noise / mean update | noise / W0 | median σ / |M| | mean σ |",
        "|---|---|---|---|---|---|---|---|",
        *lines,
    ]


def selective_section(results: list[dict[str, Any]], keys: list[tuple[str, str]]) -> list[str]:
    """Markdown: selective prediction on the training task's evaluation (seed means)."""
    lines = []
    for task, name in keys:
        rows = [r["selective"] for r in results if (r["task"], r["variant"]) == (task, name) and r.get("selective")]
        rows = [row for row in rows if row.get("aurc") is not None]
        if rows:
            lines.append(
                f"| {task} | {name} | {mean_std([row['aurc'] for row in rows], digits=3)} | "
                f"{mean_std([row['accuracy_at_coverage']['0.5'] for row in rows], 100)} | "
                f"{mean_std([row['accuracy_at_coverage']['0.8'] for row in rows], 100)} |"
            )
    if not lines:
        return []
    return [
        "",
        "Selective prediction (seed means): area under the risk-coverage curve (lower is better) and the accuracy of "
        "the most confident 50 % and 80 % of the questions:",
        "",
        "| task | variant | AURC | accuracy at 50 % % | accuracy at 80 % % |",
        "|---|---|---|---|---|",
        *lines,
    ]


def _base_dtypes(results: list[dict[str, Any]]) -> str:
    """The frozen base's dtype(s) the runs used (runs from before it was recorded: fp32, the default then)."""
    return " and ".join(sorted({r.get("base_dtype") or "float32" for r in results})) or "float32"


def summarize(results: list[dict[str, Any]], settings: dict[str, Any], variants: list[Variant]) -> str:
    """Markdown: the final table (mean ± std over seeds), the targets, N-sample curves, per-epoch curves."""
    order = {v.name: i for i, v in enumerate(variants)}
    keys = sorted({(r["task"], r["variant"]) for r in results}, key=lambda k: (k[0], order.get(k[1], 99)))
    described = "; ".join(
        f"`{v.name}` = {v.method} {json.dumps(v.options) if v.options else '(defaults)'}" for v in variants
    )
    lines = [
        f"# Calibration at small scale ({settings['tag']})",
        "",
        f"SmolLM2-135M-Instruct (frozen base in {_base_dtypes(results)}, CPU), cloze scoring (mean log-likelihood), "
        f"rank {settings['rank']}, "
        f"α = {settings['alpha']}, targets {' '.join(settings.get('target_modules') or DEFAULT_TARGETS)}; "
        f"{settings['train_size']} training questions, {settings['epochs']} epochs of batch {settings['batch_size']}, "
        f"AdamW lr {settings['lr']} (6% warm-up, linear decay); evaluation on {settings['limit']} validation questions "
        f"(fixed seeded subset), N = {settings['samples']} posterior samples for Bayesian methods. "
        f"Seeds: {' '.join(map(str, settings['seeds']))}. Variants: {described}.",
        "",
        "`step s` is each run's own median training step, timed while other runs shared the machine's cores (two at "
        "once with `--jobs 2`): it describes that run, it does not compare methods (memory and step-time ratios "
        "measured side by side: benchmarks/results/memory.md and model_memory.md).",
        "",
        "| task | variant | seeds | N | accuracy % | ECE % | NLL | Brier | ECE of a calibrated model % | posterior "
        "mean: acc % / ECE % / NLL | trainable | step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, name in keys:
        rows = [r for r in results if r["task"] == task and r["variant"] == name]
        seeds = " ".join(str(r["seed"]) for r in rows)
        means = [r["posterior_mean"] for r in rows if "posterior_mean" in r]
        mean_cell = (
            f"{mean_std([m['accuracy'] for m in means], 100)} / {mean_std([m['ece'] for m in means], 100)} / "
            f"{mean_std([m['nll'] for m in means], digits=3)}"
            if means
            else "–"
        )
        lines.append(
            f"| {task} | {name} | {seeds} | {rows[0]['n_samples']} | "
            f"{_cells([r['final'] for r in rows])} | {floor_cell(rows)} | {mean_cell} | "
            f"{rows[0].get('trainable_params') or 0:,} | "
            f"{mean_std([r.get('step_time_s') or 0 for r in rows], digits=2)} |"
        )
        if all("ts" in r for r in rows):
            temperature = mean_std([r["ts"]["temperature"] for r in rows], digits=2)
            lines.append(
                f"| {task} | {name} + TS (T = {temperature}) | {seeds} | "
                f"{rows[0]['n_samples']} | "
                f"{_cells([r['ts'] for r in rows])} | | – | | |"
            )
    checks = target_checks(results)
    if checks:
        lines += [
            "",
            "Targets of the issue for `melora` (seed means):",
            "",
            "| task | ECE vs LoRA (≤ 0.5) | ECE − BLoB's (≤ 1 pt) | accuracy − LoRA's (≥ −1 pt) |",
            "|---|---|---|---|",
        ]
        for c in checks:
            lines.append(
                f"| {c['task']} | {c['melora_ece_vs_lora']:.2f} {'✓' if c['ece_half_of_lora'] else '✗'} | "
                f"{c['melora_minus_blob_ece_points']:+.1f} {'✓' if c['ece_within_1pt_of_blob'] else '✗'} | "
                f"{c['melora_minus_lora_acc_points']:+.1f} {'✓' if c['acc_within_1pt_of_lora'] else '✗'} |"
            )
    lines += selection_section(results, settings.get("select", []))
    lines += intervals_section(results, settings.get("pairs", []), settings.get("select", []))
    lines += ood_section(results, keys)
    lines += selective_section(results, keys)
    lines += posterior_width_section(results, keys)
    sampled = [k for k in keys if any("by_samples" in r for r in results if (r["task"], r["variant"]) == k)]
    if sampled:
        lines += ["", "ECE % by number of posterior samples averaged (seed means):", ""]
        lines += ["| task | variant | " + " | ".join(f"N={k}" for k in SAMPLE_COUNTS) + " |"]
        lines += ["|---|---|" + "---|" * len(SAMPLE_COUNTS)]
        for task, name in sampled:
            rows = [r["by_samples"] for r in results if (r["task"], r["variant"]) == (task, name) and "by_samples" in r]
            cells = [
                mean_std([row[str(k)]["ece"] for row in rows], 100) if all(str(k) in row for row in rows) else "–"
                for k in SAMPLE_COUNTS
            ]
            lines.append(f"| {task} | {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "After each epoch (LoRA as is, Bayesian methods with their posterior mean, an ensemble its members after "
        "the same epoch combined; σ = mean posterior std), seed means:",
        "",
        "| task | variant | epoch | accuracy % | ECE % | NLL | σ |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, name in keys:
        rows = [r for r in results if (r["task"], r["variant"]) == (task, name)]
        for epoch in sorted({e["epoch"] for r in rows for e in r["epochs"]}):
            points = [e for r in rows for e in r["epochs"] if e["epoch"] == epoch]
            sigma = [p["sigma_mean"] for p in points if "sigma_mean" in p]
            lines.append(
                f"| {task} | {name} | {epoch} | {mean_std([p['accuracy'] for p in points], 100)} | "
                f"{mean_std([p['ece'] for p in points], 100)} | {mean_std([p['nll'] for p in points], digits=3)} | "
                f"{mean_std(sigma, digits=4) if sigma else '–'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=["arc-easy", "obqa"])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(DEFAULT_VARIANTS),
        help="Methods, or name=method:key=value,... for a method with other options.",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--train-size", type=int, default=320)
    parser.add_argument("--epochs", type=float, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--target-modules", nargs="+", default=None)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument(
        "--ts-heldout",
        type=int,
        default=200,
        help="Temperature scaling of every run on this many held-out training questions (0: none).",
    )
    parser.add_argument("--eval-every", type=int, default=2, help="Evaluate after every k-th epoch (and the last).")
    parser.add_argument(
        "--heldout-eval",
        type=int,
        default=0,
        help="Also evaluate every run on this many held-out training questions (what --select chooses on; 0: none).",
    )
    parser.add_argument(
        "--select",
        nargs="+",
        default=[],
        metavar="FAMILY=V1,V2,...",
        help="Report, per task, which variant of each family has the lowest held-out NLL (seed 1); other seeds are "
        "run (and tabulated) for that variant only, once seed 1 of every member is finished.",
    )
    parser.add_argument(
        "--pairs",
        nargs="+",
        default=[],
        metavar="A:B",
        help="Differences to give paired intervals for, as variant names or --select family names (the family's "
        "chosen variant for the task; b+ts: b temperature-scaled), e.g. melora-free:lora+ts.",
    )
    parser.add_argument(
        "--ood-tasks",
        nargs="+",
        default=[],
        metavar="TASK=OOD,...",
        help="Out-of-distribution tasks of a training task, e.g. obqa=arc-challenge,arc-easy,mmlu:college_physics: "
        "its runs are also evaluated on them, with the AUROC of telling them apart by entropy and mutual information.",
    )
    parser.add_argument("--jobs", type=int, default=2, help="Runs at a time (each with cores / jobs threads).")
    parser.add_argument("--tabulate", action="store_true", help=TABULATE_HELP)
    parser.add_argument("--tag", default="default")
    parser.add_argument(
        "--table", default=None, help="Name of the results files (<table>.json, .md; default: the tag's)."
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if unpaired := [pair for pair in args.pairs if pair.count(":") != 1]:
        parser.error(f"--pairs takes A:B (a difference A − B), not {', '.join(unpaired)}")
    variants = [parse_variant(v) for v in args.variants]
    settings = {k: v for k, v in vars(args).items() if k not in ("variants", "out", "tabulate", "ood_tasks", "table")}
    settings["ood"] = {spec.partition("=")[0]: spec.partition("=")[2].split(",") for spec in args.ood_tasks}
    settings["root"] = str(args.out / "runs" / args.tag)
    settings["store"] = str(args.out / "records" / args.tag)
    settings["variants"] = [vars(v) for v in variants]
    configurations = [(t, v, s) for t in args.tasks for v in variants for s in args.seeds]
    if args.select and not args.tabulate and (waiting := unfinished_choices(configurations, settings)):
        parser.error(
            "--select runs other seeds of each family's chosen variant only, chosen on seed 1, which is not finished "
            f"for: {', '.join(waiting)}. Run --seeds 1 of every variant of the families first (and name them all in "
            "--variants)."
        )
    if args.select:  # the members seed 1 did not choose are run (and tabulated) at seed 1 only
        configurations = without_unchosen_seeds(configurations, settings)

    run_benchmark(
        run_one,
        [(*configuration, settings) for configuration in configurations],
        jobs=args.jobs,
        out=args.out,
        tag=args.table or args.tag,
        settings=settings,
        summarize=lambda results: summarize(results, settings, variants),
        target_checks=target_checks,
        finished=stored_or_finished if args.tabulate else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
