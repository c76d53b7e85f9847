"""``bayeslora eval``: evaluate a trained run (or a base model zero-shot) and write ``eval/<task>/``."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import RunConfig, make_config
from ..evaluation import (
    EXAMPLES_FILE,
    METRICS_FILE,
    eval_examples,
    evaluate_model,
    load_predictions,
    write_evaluation,
)
from ..evaluation.completion_metrics import evaluate_completions
from ..evaluation.evaluate import ood_record
from ..io import read_json, write_json_atomic, write_text_atomic
from ..methods import get_method
from ..reporting.structure import structure_record
from ..runs import ADAPTER_DIR, TRAIN_SUMMARY, RunExistsError, eval_dir, read_run_config
from ..runs.adapters import load_adapter
from ..runs.model_card import refresh_model_card
from ..tasks import DATA_SEED, Task, load_task, seeded_heldout
from ..tuners.trunk import sampled_layers
from .common import build_scorer, check_eval_task, load_base, warn_unused_options

#: The pseudo-method of a base model evaluated without an adapter.
ZERO_SHOT = "zero-shot"

#: What an evaluation's ``metrics.json`` repeats from the run's training summary (for reports).
SUMMARY_KEYS_IN_METRICS = (
    "steps",
    "trainable_params",
    "train_runtime_s",
    "train_runtime_unmeasured_steps",
    "laplace_fit_s",
    "step_time_s",
    "step_memory_mb",
    "train_peak_memory_mb",
    "peak_memory_mb",
)


def resolve_samples(config: RunConfig, samples: int | None) -> int:
    """Posterior samples for an evaluation: the request (else the run's ``--samples``, else the method's default);
    1 for deterministic methods and zero-shot."""
    return get_method(config.method).samples(samples if samples is not None else config.samples, config)


def evaluate_and_write(
    model: nn.Module,
    tokenizer,
    config: RunConfig,
    train_task: Task,
    eval_task: Task,
    run_dir: Path,
    summary: dict[str, Any] | None,
    *,
    samples: int | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    out_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``eval_task`` and write ``eval/<task>/`` of ``run_dir`` (or ``out_dir``)."""
    method = get_method(config.method)
    n_samples = resolve_samples(config, samples)
    if eval_task.kind == "instruction":
        return _evaluate_completions_and_write(
            model, tokenizer, config, train_task, eval_task, run_dir, summary, n_samples, limit, batch_size, out_dir,
            progress,
        )  # fmt: skip
    num_classes = train_task.num_classes if eval_task.kind == "classification" else None
    scorer = build_scorer(eval_task, tokenizer, config, num_classes=num_classes)
    limit = limit if limit is not None else config.limit
    examples = eval_examples(eval_task, limit)
    torch.manual_seed(config.seed)  # sampled predictions are reproducible for a given seed
    metrics, prediction = evaluate_model(
        model,
        scorer,
        examples,
        n_samples=n_samples,
        batch_size=batch_size or config.eval_batch_size,
        progress=progress,
        **method.predictive(config, n_samples, run_dir),
    )
    record = _record(config, train_task, eval_task, scorer.name, metrics, limit, run_dir, summary)
    if method.trains:
        record.update(structure_record(model))
    out_dir = out_dir or eval_dir(run_dir, eval_task.name)
    title = f"{config.method} on {eval_task.name} ({scorer.name}, N={n_samples})"
    write_evaluation(out_dir, record, prediction, title)
    return record


#: Run options that change an evaluation's predictions besides scoring and predictive, recorded with it (so that
#: calibrate reuses a held-out evaluation only if it was made with the run's own).
PREDICTION_OPTIONS = ("max_length", "num_layers", "dtype", "load_in_4bit", "load_in_8bit")


def prediction_settings(config: RunConfig, scoring: str) -> dict[str, Any]:
    """How an evaluation with ``config`` scored and loaded the model: the scoring, the cloze normalisation (None
    for other scorings), the chat template (None when unused) and :data:`PREDICTION_OPTIONS`. Its ``metrics.json``
    records those that are not None, so ``record.get(key)`` gives each one back."""
    return {
        "scoring": scoring,
        "cloze_normalization": config.cloze_normalization if scoring == "cloze" else None,
        "chat_template": True if config.chat_template else None,
        **{key: getattr(config, key) for key in PREDICTION_OPTIONS},
    }


def _record(
    config: RunConfig,
    train_task: Task,
    eval_task: Task,
    scoring: str,
    metrics: dict[str, Any],
    limit: int | None,
    run_dir: Path,
    summary: dict[str, Any] | None,
) -> dict[str, Any]:
    """What an evaluation's ``metrics.json`` records: the task, method, model and scoring, the metrics, the subset
    and seed, and what it repeats from the run's training summary."""
    record: dict[str, Any] = {
        "task": eval_task.name,
        "method": config.method,
        "model": config.model,
        **{key: value for key, value in prediction_settings(config, scoring).items() if value is not None},
        **get_method(config.method).predictive_record(config),
        **metrics,
        "limit": limit,
        "seed": config.seed,
        "run": str(run_dir),
        "task_source": eval_task.source,
    }
    if summary:
        record["train_task"] = train_task.name
        record.update({key: summary[key] for key in SUMMARY_KEYS_IN_METRICS if key in summary})
    return record


def _evaluate_completions_and_write(
    model: nn.Module,
    tokenizer,
    config: RunConfig,
    train_task: Task,
    eval_task: Task,
    run_dir: Path,
    summary: dict[str, Any] | None,
    n_samples: int,
    limit: int | None,
    batch_size: int | None,
    out_dir: Path | None,
    progress: bool,
) -> dict[str, Any]:
    """Instruction data: the completions' per-token NLL and perplexity under the posterior predictive, into
    ``metrics.json`` and, per example, ``predictions.jsonl`` (see :mod:`bayeslora.evaluation.completion_metrics`)."""
    method = get_method(config.method)
    predictive = method.predictive(config, n_samples, run_dir)
    if "sampler" in predictive:
        raise ValueError(f"--method {config.method} predicts class scores only; instruction data has none")
    scorer = build_scorer(eval_task, tokenizer, config)
    limit = limit if limit is not None else config.limit
    torch.manual_seed(config.seed)
    with sampled_layers(model, predictive.get("sample_layers", "all")):
        metrics, per_example = evaluate_completions(
            model,
            scorer,
            eval_examples(eval_task, limit),
            n_samples=n_samples,
            batch_size=batch_size or config.eval_batch_size,
            progress=progress,
            dropout=predictive.get("dropout", False),
            members=predictive.get("members", ()),
        )
    record = _record(config, train_task, eval_task, scorer.name, metrics, limit, run_dir, summary)
    out_dir = out_dir or eval_dir(run_dir, eval_task.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / EXAMPLES_FILE, "".join(json.dumps(row) + "\n" for row in per_example))
    write_json_atomic(out_dir / METRICS_FILE, record)
    return record


def heldout_task(train_task: Task, train_size: int | None, size: int) -> Task:
    """The ``size`` training examples a run with ``train_size`` did not train on, as an evaluation-only task named
    ``<task>-heldout`` (a file task by its stem; an error if the run trained on the whole split)."""
    if size <= 0:
        raise ValueError(f"--heldout must be positive (held-out training examples), got {size}")
    examples = seeded_heldout(train_task.split("train"), train_size, size, DATA_SEED)
    source = f"{len(examples)} examples of {train_task.name}'s training split that the run did not train on"
    name = f"{eval_dir(Path(), train_task.name).name}-heldout"
    return Task(name, train_task.kind, None, examples, train_task.num_classes, train_task.label_names, source)


def evaluate_out_of_distribution(
    model: nn.Module,
    tokenizer,
    config: RunConfig,
    train_task: Task,
    in_distribution: Path,
    ood_tasks: Sequence[Task],
    run_dir: Path,
    summary: dict[str, Any] | None,
    *,
    base_dir: Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate ``model`` on every out-of-distribution task (each into ``eval/<task>/`` of ``base_dir``, by default
    the run) and record in the in-distribution evaluation ``in_distribution`` (its directory) an ``ood`` entry per
    task: the AUROC of the predictive entropy and of the mutual information separating that task's examples from
    the in-distribution ones (see :func:`bayeslora.evaluation.evaluate.ood_record`). Returns the updated record.
    ``options``: those of :func:`evaluate_and_write` (samples, limit, batch size, progress)."""
    inside = load_predictions(in_distribution)
    record = read_json(in_distribution / METRICS_FILE)
    ood = dict(record.get("ood", {}))
    for ood_task in ood_tasks:
        out_dir = eval_dir(base_dir or run_dir, ood_task.name)
        evaluate_and_write(model, tokenizer, config, train_task, ood_task, run_dir, summary, out_dir=out_dir, **options)
        ood[ood_task.name] = ood_record(inside, load_predictions(out_dir))
    record["ood"] = ood
    write_json_atomic(in_distribution / METRICS_FILE, record)
    return record


def evaluate(
    run: str | Path | None = None,
    *,
    model: str | None = None,
    task: str | None = None,
    samples: int | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    ood_tasks: Sequence[str] = (),
    heldout: int | None = None,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate a trained run (``run``) or a base model zero-shot (``model``); returns the metrics.

    Args:
        run: a run directory written by :func:`bayeslora.train`.
        model: instead of a run, a base model evaluated without adapter (method ``zero-shot``).
        task: evaluation task (default: the run's training task).
        samples: posterior samples (default: the method's; 0 = posterior mean for Bayesian methods).
        limit: evaluate on a fixed seeded subsample of this many examples.
        heldout: instead of ``task``, evaluate on this many training examples the run did not train on (the
            held-out examples that follow its ``--train-size`` subset, which calibrate and early stopping also use),
            into ``eval/<task>-heldout/``: where hyperparameters are chosen without the evaluation questions.
        ood_tasks: tasks evaluated as out of distribution too (each its own ``eval/<task>/``); the returned
            metrics of ``task`` then hold, per such task, the AUROC of telling them apart by predictive entropy and
            by mutual information (``ood``).
        output_dir: the directory whose ``eval/<task>/`` receives the results (default: the run directory;
            for zero-shot ``runs/<model>-zero-shot``).
        overwrite: replace an existing ``eval/<task>/`` (refused otherwise).
        options: further RunConfig options, e.g. ``scoring``, ``num_layers``, ``max_length``.
    """
    if (run is None) == (model is None):
        raise ValueError("evaluate needs exactly one of a run directory or a base model")
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be positive (a number of evaluation examples), got {limit}")
    if run is not None:
        stored = read_run_config(run)
        config = make_config(**{**stored, **options})
        warn_unused_options(config, [*options, *(["samples"] if samples is not None else [])])
        train_task = load_task(config.task)
        eval_task = train_task if task in (None, config.task) else load_task(task)
        if heldout:
            if task not in (None, config.task):
                raise ValueError("--heldout evaluates the run's own training task; leave --task out")
            eval_task = heldout_task(train_task, config.train_size, heldout)
        check_eval_task(train_task, eval_task)
        base_dir = Path(output_dir) if output_dir else Path(run)
    else:
        if task is None:
            raise ValueError("zero-shot evaluation needs a task")
        config = dataclasses.replace(make_config(model=model, task=task, **options), method=ZERO_SHOT)
        eval_task = train_task = load_task(task)
        if eval_task.kind == "classification":
            raise ValueError(
                f"'{task}' is a classification task: a base model has no trained classification head to "
                f"evaluate zero-shot. Train a run first."
            )
        base_dir = Path(output_dir) if output_dir else Path("runs") / f"{Path(model).name}-zero-shot"
    ood = [load_task(name) for name in ood_tasks]
    for other in ood:
        check_eval_task(train_task, other)
    out_dir = eval_dir(base_dir, eval_task.name)
    for target in [out_dir, *(eval_dir(base_dir, other.name) for other in ood)]:
        if target.exists() and not overwrite:
            raise RunExistsError(
                f"{target} already holds an evaluation. Pass --overwrite to replace it, or --output-dir to write "
                f"elsewhere."
            )
    network, tokenizer = load_base(config, train_task, progress=progress)
    summary = None
    if run is not None:
        network = load_adapter(network, Path(run) / ADAPTER_DIR, force=config.force_base)
        summary_path = Path(run) / TRAIN_SUMMARY
        summary = read_json(summary_path) if summary_path.is_file() else None
    network.eval()
    run_files = Path(run) if run is not None else base_dir  # where the run's own files are (a Laplace posterior)
    settings = {"samples": samples, "limit": limit, "batch_size": batch_size, "progress": progress}
    record = evaluate_and_write(
        network, tokenizer, config, train_task, eval_task, run_files, summary, out_dir=out_dir, **settings
    )
    if ood:
        record = evaluate_out_of_distribution(
            network, tokenizer, config, train_task, out_dir, ood, run_files, summary, base_dir=base_dir, **settings
        )
    if run is not None and base_dir.resolve() == Path(run).resolve():
        refresh_model_card(Path(run))
    return record
