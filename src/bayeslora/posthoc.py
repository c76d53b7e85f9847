"""What is done to a finished run: export its adapter, calibrate its predictions with a temperature, fit a
Laplace posterior over its LoRA weights."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch

from .adapters import load_adapter
from .api import (
    build_scorer,
    check_method_inputs,
    evaluate_and_write,
    fit_laplace,
    load_base,
    load_eval_tasks,
    prediction_options,
    predictive_record,
    resolve_samples,
    write_config,
)
from .config import LAPLACE_OPTIONS, make_config
from .evaluation import evaluate_model, write_evaluation
from .io import read_json, write_json_atomic
from .methods import get_method
from .runs import (
    ADAPTER_DIR,
    CONFIG_FILE,
    TRAIN_LOG,
    TRAIN_SUMMARY,
    RunExistsError,
    eval_dir,
    has_adapter,
    new_run_dir,
    read_run_config,
)
from .tasks import DATA_SEED, HELDOUT_EXAMPLES, load_task, seeded_heldout, seeded_subset

#: The methods whose adapter a post-hoc Laplace posterior can be fitted to (a single plain LoRA adapter).
LAPLACE_SOURCES = ("lora", "map")
#: The suffix of a temperature-scaled evaluation's folder: ``eval/<task>-ts/``.
TS_SUFFIX = "-ts"


def export(
    run: str | Path, to: str, out: str | Path, *, force_base: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Export the adapter of a run: ``to="lora"`` a plain PEFT LoRA adapter (B-LoRA truncated to its learned
    ranks and dequantized; the posterior mean of Me-LoRA and BLoB), ``to="packed"`` B-LoRA's integer codes at
    their learned bit-widths. Returns what was written and its size against the 16-bit LoRA adapter.
    ``force_base``: load the adapter even if its base model's fingerprint differs."""
    from .exporters import EXPORT_FORMATS, PACKED_WEIGHTS, export_lora, export_packed, reference_lora_bytes

    if to not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format '{to}': {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    if out.exists():
        raise RunExistsError(f"{out} already exists; choose another --out (exports never overwrite).")
    config = make_config(**read_run_config(run))
    task = load_task(config.task)
    network, _ = load_base(config, task, progress=progress)
    network = load_adapter(network, Path(run) / ADAPTER_DIR, force=force_base)
    if to == "lora":
        export_lora(network, out)
        size = (out / "adapter_model.safetensors").stat().st_size
    else:
        export_packed(network, out)
        size = (out / PACKED_WEIGHTS).stat().st_size  # the factors; a classifier head is stored apart
    reference = reference_lora_bytes(network)
    return {
        "format": to,
        "out": str(out),
        "bytes": size,
        "reference_16bit_lora_bytes": reference,
        "ratio": size / reference,
    }


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
    samples, MC dropout, ensemble members) with as many samples as the evaluation it rescales. The saved
    predictions of every evaluation of the run (or of ``task``) are rescaled as softmax(log p / T) and
    written to ``eval/<task>-ts/`` as method ``<method>+ts``. Returns the new metrics records.
    """
    from .evaluation import load_predictions
    from .metrics import classification_metrics
    from .temperature import fit_temperature, scaled

    if heldout <= 0:
        raise ValueError(f"--heldout must be positive (training examples to fit the temperature on), got {heldout}")
    run = Path(run)
    config = make_config(**read_run_config(run))
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
    examples = seeded_heldout(train_task.split("train"), config.train_size, heldout, DATA_SEED)
    network, tokenizer = load_base(config, train_task, progress=progress)
    network = load_adapter(network, run / ADAPTER_DIR, force=force_base)
    scorer = build_scorer(train_task, tokenizer, config, num_classes=train_task.num_classes)
    temperatures: dict[tuple, float] = {}

    def temperature_for(evaluation: dict[str, Any]) -> float:
        """T fitted on the held-out examples predicted as ``evaluation`` was: with its number of samples (an
        evaluation of the posterior mean, ``--samples 0``, gets the posterior mean's T) and its predictive
        options (an ensemble's combination rule, a Laplace predictive) where it records them."""
        predictive = {key: evaluation.get(key, value) for key, value in predictive_record(config).items()}
        key = (evaluation["n_samples"], *sorted(predictive.items()))
        if key not in temperatures:
            as_evaluated = dataclasses.replace(config, **predictive)
            n_samples = resolve_samples(as_evaluated, evaluation["n_samples"])
            torch.manual_seed(config.seed)
            _, fitted_on = evaluate_model(
                network,
                scorer,
                examples,
                n_samples=n_samples,
                batch_size=config.eval_batch_size,
                progress=progress,
                **prediction_options(as_evaluated, n_samples, run),
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
    return records


def laplace(
    run: str | Path,
    *,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    force_base: bool = False,
    progress: bool = True,
    **options: Any,
) -> Path:
    """Laplace-LoRA post hoc: a K-FAC Laplace posterior over the weights of a finished LoRA or MAP run.

    Writes a new run directory (``output_dir``, default ``<run>-laplace``) of method ``laplace``: the same
    adapter, the posterior (``laplace.safetensors``) and every evaluation of the source run predicted with
    it; the source run is not changed. The result is that of ``train(method="laplace")`` with the LoRA run's
    options and seed (same LoRA, same fit), without training again. ``options``: ``laplace_subset``,
    ``laplace_prior``, ``laplace_predictive``, ``samples``, ``eval_batch_size``. Returns the new run directory.
    """
    source = Path(run)
    stored = read_run_config(source)
    if stored.get("method") not in LAPLACE_SOURCES:
        raise ValueError(
            f"A post-hoc Laplace posterior is fitted to a LoRA or MAP run; {source} is a '{stored.get('method')}' "
            f"run. Train one with --method lora (or map), or train with --method laplace directly."
        )
    if not has_adapter(source / ADAPTER_DIR) or not (source / TRAIN_SUMMARY).is_file():
        raise FileNotFoundError(f"{source} is not a finished run (no adapter or {TRAIN_SUMMARY}): nothing to fit.")
    unknown = sorted(set(options) - set(LAPLACE_OPTIONS))
    if unknown:
        raise ValueError(f"laplace takes the options {', '.join(LAPLACE_OPTIONS)}; not {', '.join(unknown)}")
    out = Path(output_dir) if output_dir is not None else source.with_name(f"{source.name}-laplace")
    if out.resolve() == source.resolve():
        raise ValueError(
            f"--output-dir {out} is the LoRA run the posterior is fitted to; the Laplace run is a new directory "
            f"(by default {source.name}-laplace next to it)."
        )
    config = make_config(
        **{**stored, "samples": None, **options, "method": "laplace", "output_dir": str(out), "force_base": force_base}
    )
    config = get_method("laplace").resolve(config)
    task = load_task(config.task)
    config = check_method_inputs(config, task)
    train_examples = seeded_subset(task.split("train"), config.train_size, DATA_SEED)
    eval_tasks = load_eval_tasks(config, task, config.eval_tasks or [])
    with new_run_dir(out, overwrite) as new:
        model, tokenizer = load_base(config, task, progress=progress)
        model = load_adapter(model, source / ADAPTER_DIR, force=force_base)
        shutil.copytree(source / ADAPTER_DIR, new / ADAPTER_DIR)
        if (source / TRAIN_LOG).is_file():
            shutil.copy2(source / TRAIN_LOG, new / TRAIN_LOG)
        write_config(new / CONFIG_FILE, config)
        fitted = fit_laplace(model, config, build_scorer(task, tokenizer, config), task, train_examples, new)
        summary = {**read_json(source / TRAIN_SUMMARY), "method": "laplace", **fitted, "laplace_of": str(source)}
        write_json_atomic(new / TRAIN_SUMMARY, summary)
        for eval_task in eval_tasks:
            evaluate_and_write(model, tokenizer, config, task, eval_task, new, summary, progress=progress)
    return out
