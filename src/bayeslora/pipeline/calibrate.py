"""``bayeslora calibrate``: temperature scaling of a finished run, fitted on held-out training examples."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..config import make_config
from ..evaluation import METRICS_FILE, evaluate_model, load_predictions, write_evaluation
from ..evaluation.predictive import Prediction
from ..io import read_json
from ..methods import get_method
from ..runs import ADAPTER_DIR, RunExistsError, eval_dir, read_run_config
from ..runs.adapters import load_adapter
from ..runs.model_card import refresh_model_card
from ..tasks import HELDOUT_EXAMPLES, Task, load_task
from .common import build_scorer, load_base, resolved_scoring
from .evaluate import heldout_task, prediction_settings, resolve_samples

#: The suffix of a temperature-scaled evaluation's folder: ``eval/<task>-ts/``.
TS_SUFFIX = "-ts"


def calibrate(
    run: str | Path,
    *,
    task: str | None = None,
    heldout: int = HELDOUT_EXAMPLES,
    overwrite: bool = False,
    force_base: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Temperature scaling of a trained run (post hoc, any method).

    One temperature T is fitted on ``heldout`` training examples the run never trained on (those that follow
    its ``--train-size`` subset in the same seeded order), predicted the way the method predicts (posterior
    samples, MC dropout, ensemble members) with as many samples as the evaluation it rescales; where the run's
    ``eval/<task>-heldout/`` (``bayeslora eval --heldout``) already predicted exactly these examples that way,
    its saved predictions are used instead of a second pass (see :func:`saved_heldout_prediction`; the model is
    then not loaded at all when every temperature comes from them). The saved
    predictions of every evaluation of the run (or of ``task``) are rescaled as softmax(log p / T) and
    written to ``eval/<task>-ts/`` as method ``<method>+ts``. Returns the new metrics records.
    """
    from ..evaluation.metrics import classification_metrics
    from ..evaluation.temperature import fit_temperature, scaled

    if heldout <= 0:
        raise ValueError(f"--heldout must be positive (training examples to fit the temperature on), got {heldout}")
    run = Path(run)
    config = make_config(**read_run_config(run))
    method = get_method(config.method)
    train_task = load_task(config.task)
    sources = [eval_dir(run, task)] if task else sorted(p.parent for p in (run / "eval").glob("*/metrics.json"))
    if task and sources[0].name.endswith(TS_SUFFIX):
        source = sources[0].name.removesuffix(TS_SUFFIX)
        raise ValueError(f"{sources[0]} is already temperature-scaled; calibrate its source: --task {source}")
    sources = [d for d in sources if not d.name.endswith(TS_SUFFIX)]
    if not sources or not all((d / "metrics.json").is_file() for d in sources):
        raise FileNotFoundError(
            f"{run} has no evaluation{' on ' + task if task else ''} to calibrate; run "
            f"`bayeslora eval --run {run}` first"
        )
    targets = [d.with_name(d.name + TS_SUFFIX) for d in sources]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise RunExistsError(f"{', '.join(existing)} already exist(s). Pass --overwrite to replace.")
    heldout_examples = heldout_task(train_task, config.train_size, heldout)
    examples = heldout_examples.eval
    loaded: list = []  # (model, scorer), loaded once a pass over the held-out examples is needed

    def model_and_scorer() -> tuple:
        if not loaded:
            network, tokenizer = load_base(config, train_task, progress=progress)
            network = load_adapter(network, run / ADAPTER_DIR, force=force_base)
            loaded.append((network, build_scorer(train_task, tokenizer, config, num_classes=train_task.num_classes)))
        return loaded[0]

    temperatures: dict[tuple, float] = {}
    defaults = method.predictive_record(config)  # how an evaluation that does not record them predicted

    def temperature_for(evaluation: dict[str, Any]) -> float:
        """T fitted on the held-out examples predicted as ``evaluation`` was: with its number of samples (an
        evaluation of the posterior mean, ``--samples 0``, gets the posterior mean's T) and its predictive
        options (an ensemble's combination rule, a Laplace predictive) where it records them."""
        predictive = {key: evaluation.get(key, value) for key, value in defaults.items()}
        key = (evaluation["n_samples"], *sorted(predictive.items()))
        if key not in temperatures:
            as_evaluated = dataclasses.replace(config, **predictive)
            n_samples = resolve_samples(as_evaluated, evaluation["n_samples"])
            expected = {
                "n_samples": n_samples,
                "seed": config.seed,
                **prediction_settings(config, resolved_scoring(train_task, config.scoring)),  # the scorer's name
                **predictive,
            }
            if fitted_on := saved_heldout_prediction(run, heldout_examples, expected, defaults):
                temperatures[key] = fit_temperature(fitted_on.probs, fitted_on.labels)
                return temperatures[key]
            network, scorer = model_and_scorer()
            torch.manual_seed(config.seed)
            _, fitted_on = evaluate_model(
                network,
                scorer,
                examples,
                n_samples=n_samples,
                batch_size=config.eval_batch_size,
                progress=progress,
                **method.predictive(as_evaluated, n_samples, run),
            )
            temperatures[key] = fit_temperature(fitted_on.probs, fitted_on.labels)
        return temperatures[key]

    records = []
    for source, target in zip(sources, targets, strict=True):
        before = read_json(source / "metrics.json")
        temperature = temperature_for(before)
        prediction = load_predictions(source)
        prediction.probs = scaled(prediction.probs, temperature).float()
        prediction.sample_probs = None  # the temperature applies to the averaged prediction only
        record = {
            **before,
            "method": f"{before['method']}+ts",
            **classification_metrics(prediction.probs, prediction.labels),
            "temperature": temperature,
            "temperature_examples": len(examples),
            "calibrated_from": str(source),
        }
        write_evaluation(target, record, prediction, f"{record['method']} on {before['task']} (T = {temperature:.2f})")
        records.append(record)
    refresh_model_card(run)
    return records


def saved_heldout_prediction(
    run: Path, heldout: Task, expected: dict[str, Any], defaults: dict[str, Any] | None = None
) -> Prediction | None:
    """The predictions the run's ``eval/<task>-heldout/`` holds for the held-out examples ``heldout``, if that
    evaluation predicted exactly them (same count, source and labels in the same order) as ``expected`` says
    (its recorded number of samples, scoring, seed, model options such as ``max_length`` and ``dtype``, and
    predictive options; a predictive option it does not record, being older, is taken at its value in
    ``defaults``; an evaluation older than the recorded model options is not reused): then they are draws of the same
    predictive a new pass would make (identical ones at the same evaluation batch size), and temperature scaling
    needs no second pass over the held-out examples. None otherwise."""
    source = eval_dir(run, heldout.name)
    if not (source / METRICS_FILE).is_file():
        return None
    saved = {**(defaults or {}), **read_json(source / METRICS_FILE)}
    expected = {**expected, "n_examples": len(heldout.eval), "task_source": heldout.source}
    if any(saved.get(key) != value for key, value in expected.items()):
        return None
    prediction = load_predictions(source)
    if prediction.labels.tolist() != [example.label for example in heldout.eval]:
        return None
    return prediction
