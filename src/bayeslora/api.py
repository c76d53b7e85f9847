"""The Python API, mirroring the CLI: ``train`` a run, ``evaluate`` a run (or a base model zero-shot).

import bayeslora as bl

run = bl.train(model="smollm2-135m", task="arc-easy", method="lora", max_steps=100, batch_size=4,
               lr=3e-4, output_dir="runs/arc-lora")
metrics = bl.evaluate(run, task="obqa", limit=200)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import TrainerCallback

from .baselines.adalora import AdaLoraAllocation, AdaLoraOrthogonality, adalora_tuner
from .bops import bops_report
from .config import RunConfig, make_config
from .evaluation import eval_examples, evaluate_model, write_evaluation
from .gating import GatePenalty, GateSchedule, blora_tuner, gate_parameters
from .io import read_json, write_dir_atomic, write_json_atomic, write_text_atomic
from .methods import get_method
from .models import check_target_modules, default_target_modules, load_model
from .objectives import bayesian_objective, variance_parameters
from .plots import save_structure_heatmap
from .runs import (
    ADAPTER_DIR,
    BOPS_FILE,
    CONFIG_FILE,
    STRUCTURE_PLOT,
    TRAIN_LOG,
    TRAIN_SUMMARY,
    RunExistsError,
    eval_dir,
    new_run_dir,
    read_run_config,
)
from .scoring import Scorer, make_scorer
from .system import peak_memory_mb, versions
from .tasks import DATA_SEED, Task, load_task, seeded_heldout, seeded_subset
from .training import (
    BayesLoraTrainer,
    ExampleDataset,
    JsonlLogger,
    StepMemoryProbe,
    combine_losses,
    training_arguments,
)


def _head_for(task: Task) -> str:
    return "classification" if task.kind == "classification" else "causal-lm"


def _resolved_scoring(task: Task, scoring: str | None) -> str:
    if task.kind == "classification":
        return "classification"
    return scoring or "cloze"


def _check_eval_task(train_task: Task, eval_task: Task) -> None:
    """An evaluation task must fit the trained head."""
    if _head_for(train_task) != _head_for(eval_task):
        raise ValueError(
            f"Cannot evaluate a model trained on '{train_task.name}' ({train_task.kind}) on "
            f"'{eval_task.name}' ({eval_task.kind}): the task kinds differ."
        )
    if train_task.kind == "classification" and train_task.num_classes != eval_task.num_classes:
        raise ValueError(
            f"'{eval_task.name}' has {eval_task.num_classes} classes but the head trained on "
            f"'{train_task.name}' has {train_task.num_classes}."
        )


def build_scorer(task: Task, tokenizer, config: RunConfig, num_classes: int | None = None) -> Scorer:
    """The scorer a run uses for ``task``."""
    return make_scorer(
        task,
        tokenizer,
        _resolved_scoring(task, config.scoring),
        max_length=config.max_length,
        cloze_normalization=config.cloze_normalization,
        num_classes=num_classes,
    )


def attach_adapter(
    model: nn.Module, config: RunConfig, task: Task, total_steps: int = 1, adapter_name: str = "default"
):
    """Wrap ``model`` in the PEFT adapter of ``config.method`` (targets checked against the model; options
    left unset take the method's defaults). ``total_steps``: the optimizer steps of the training run (AdaLoRA
    schedules its rank budget over them)."""
    from peft import get_peft_model

    method = get_method(config.method)
    config = method.resolve(config)
    targets = config.target_modules or default_target_modules(model)
    check_target_modules(model, targets)
    task_type = "SEQ_CLS" if task.kind == "classification" else "CAUSAL_LM"
    with _quiet_peft_wrapping():
        peft_config = method.build_config(config, targets, task_type, total_steps)
        return get_peft_model(model, peft_config, adapter_name=adapter_name), targets


@contextlib.contextmanager
def _quiet_peft_wrapping():
    """Silence two warnings of PEFT's model wrapping that do not concern users: adapting a tied ``lm_head``
    (SmolLM2) is intended, since the adapter acts on the output head only and never changes the shared
    embedding matrix; and ``is_gradient_checkpointing`` is a transformers-internal deprecation."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def load_adapter(base: nn.Module, adapter_dir: str | Path):
    """A saved adapter on ``base`` (``PeftModel.from_pretrained``), in eval mode. A directory holding one
    sub-directory per named adapter (an ensemble's members) loads them all, the first one active."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "adapter_config.json").is_file():
        names = [None]
    else:
        names = sorted(p.name for p in adapter_dir.iterdir() if (p / "adapter_config.json").is_file())
        if not names:
            raise FileNotFoundError(f"{adapter_dir} holds no adapter (no adapter_config.json)")
    with _quiet_peft_wrapping():
        if names == [None]:
            model = PeftModel.from_pretrained(base, str(adapter_dir))
        else:
            model = PeftModel.from_pretrained(base, str(adapter_dir / names[0]), adapter_name=names[0])
            for name in names[1:]:
                model.load_adapter(str(adapter_dir / name), adapter_name=name)
            model.set_adapter(names[0])
    model.eval()
    return model


def save_adapter(model: nn.Module, path: Path) -> None:
    """Save the PEFT adapter to ``path`` atomically. Only adapter weights are written: the base model's
    embeddings are never changed (LoRA on a tied ``lm_head`` leaves the shared matrix as it is), so PEFT's
    habit of saving whole embedding matrices when an embedding-tied layer is adapted is turned off."""
    write_dir_atomic(path, lambda tmp: model.save_pretrained(str(tmp), save_embedding_layers=False))


def _trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train(
    config: RunConfig | None = None,
    *,
    recipe: str | Path | None = None,
    progress: bool = True,
    callbacks: Sequence[TrainerCallback] = (),
    **overrides: Any,
) -> Path:
    """Fine-tune a model and evaluate it; returns the run directory.

    Args:
        config: a full :class:`RunConfig`; or build one from ``recipe`` (YAML) and ``overrides``.
        progress: show progress bars.
        callbacks: extra ``transformers.TrainerCallback`` objects (e.g. an evaluation every epoch).

    Everything is validated (options, method, tasks) before the run directory is created; the directory
    is refused if it exists, unless ``overwrite`` (see :func:`bayeslora.runs.new_run_dir`).
    """
    if config is None:
        config = make_config(recipe, **overrides)
    elif recipe or overrides:
        raise ValueError("pass either a RunConfig or recipe/overrides, not both")
    config.validate()
    config = get_method(config.method).resolve(config)
    task = load_task(config.task)
    train_examples = seeded_subset(task.split("train"), config.train_size, DATA_SEED)
    eval_names = config.eval_tasks if config.eval_tasks is not None else ([config.task] if task.heldout_eval else [])
    eval_tasks = [task if name == config.task else load_task(name) for name in eval_names]
    for eval_task in eval_tasks:
        _check_eval_task(task, eval_task)
    run_dir = config.resolved_output_dir()
    if run_dir.exists() and not config.overwrite:  # fail before loading anything heavy
        raise RunExistsError(
            f"Run directory {run_dir} already exists. Choose another --output-dir, or pass --overwrite to "
            f"replace it (the old run is kept until the new one finishes)."
        )

    with new_run_dir(run_dir, config.overwrite) as run:
        transformers.set_seed(config.seed)
        model, tokenizer = _load_for(config, task, progress=progress)
        members = ensemble_members(config)
        steps = total_steps(config, len(train_examples))
        model, targets = attach_adapter(model, config, task, steps, adapter_name=members[0] if members else "default")
        resolved = dataclasses.replace(
            config,
            target_modules=targets,
            scoring=None if task.kind == "classification" else _resolved_scoring(task, config.scoring),
            output_dir=str(run_dir),
            overwrite=False,
            eval_tasks=eval_names,
        )
        _write_config(run / CONFIG_FILE, resolved)
        scorer = build_scorer(task, tokenizer, config)
        fits = []
        for index, member in enumerate(members or [None]):
            seed = config.seed + index  # ensemble members differ by initialisation and data order
            if member is not None:
                if index > 0:
                    transformers.set_seed(seed)
                    model.add_adapter(member, model.peft_config[members[0]])
                model.set_adapter(member)
            member_config = dataclasses.replace(config, seed=seed)
            fits.append(_fit(model, member_config, run, train_examples, scorer, callbacks, member, progress=progress))
        model = fits[-1].model
        save_adapter(model, run / ADAPTER_DIR)
        device = next(model.parameters()).device
        runtime = sum(fit.output.metrics.get("train_runtime", 0.0) for fit in fits)
        steps_done = sum(fit.output.global_step for fit in fits)
        summary = {
            "task": config.task,
            "method": config.method,
            "model": config.model,
            "task_source": task.source,
            "train_examples": len(train_examples),
            "steps": steps_done,
            **({"ensemble_members": len(members)} if members else {}),
            "train_loss": sum(fit.output.training_loss for fit in fits) / len(fits),
            "train_runtime_s": round(runtime, 2),
            "step_time_s": round(runtime / max(1, steps_done), 3),
            "step_memory_mb": None if fits[0].step_memory_mib is None else round(fits[0].step_memory_mib, 1),
            "peak_memory_mb": round(peak_memory_mb(device), 1),
            "trainable_params": _trainable_parameters(model) * len(fits),
            "total_params": sum(p.numel() for p in model.parameters()),
            "versions": versions(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json_atomic(run / TRAIN_SUMMARY, summary)
        if learns_structure(model):
            write_structure(model, run, title=f"{config.method} on {config.task}")
        for eval_task in eval_tasks:
            _evaluate_and_write(model, tokenizer, resolved, task, eval_task, run, summary, progress=progress)
    return run_dir


@dataclasses.dataclass
class _Fit:
    """What one training pass leaves: the trained model, the Trainer's output, one step's memory."""

    model: nn.Module
    output: Any
    step_memory_mib: float | None


def _fit(
    model: nn.Module,
    config: RunConfig,
    run: Path,
    train_examples: list,
    scorer: Scorer,
    callbacks: Sequence[TrainerCallback],
    member: str | None,
    *,
    progress: bool,
) -> _Fit:
    """Train the model's active adapter with the transformers Trainer (the method's loss terms, callbacks
    and learning rates); log lines go to ``train_log.jsonl``, tagged with the ensemble ``member``."""
    extra_loss, objective_callbacks, special_lrs = training_extras(model, config, len(train_examples))
    memory_probe = StepMemoryProbe()
    trainer = BayesLoraTrainer(
        model=model,
        args=training_arguments(config, run / "checkpoints", progress=progress),
        train_dataset=ExampleDataset(train_examples),
        data_collator=scorer.collate,
        scorer=scorer,
        extra_loss=extra_loss,
        special_lrs=special_lrs,
        callbacks=[
            *objective_callbacks,
            *callbacks,
            memory_probe,
            JsonlLogger(run / TRAIN_LOG, {"member": member} if member else None),
        ],
    )
    output = trainer.train()
    return _Fit(trainer.model, output, memory_probe.peak_mib)


def ensemble_members(config: RunConfig) -> list[str]:
    """The adapter names of an ensemble run (``member0``, ...), or [] for other methods."""
    if get_method(config.method).prediction != "ensemble":
        return []
    return [f"member{k}" for k in range(config.ensemble_size)]


def total_steps(config: RunConfig, n_train: int) -> int:
    """The optimizer steps a run takes, as the Trainer counts them: ``--max-steps``, else
    ⌈epochs · max(1, ⌈N_train / batch⌉ // accumulation)⌉ (one device)."""
    if config.max_steps:
        return config.max_steps
    per_epoch = max(1, math.ceil(n_train / config.batch_size) // config.grad_accum)
    return math.ceil(config.epochs * per_epoch)


def training_extras(model: nn.Module, config: RunConfig, n_train: int):
    """``(extra_loss, callbacks, special_lrs)`` of the method's objective: the KL term of a posterior (Me-LoRA,
    BLoB, B-LoRA's Bayesian core), the gates' penalty and schedule (B-LoRA), with their learning rates, and
    AdaLoRA's budget allocation and orthogonality loss."""
    losses, callbacks, special_lrs = [], [], []
    variances = variance_parameters(model)
    if variances:
        kl_loss, kl_callbacks = bayesian_objective(config, n_train)
        losses += [kl_loss] if kl_loss is not None else []
        callbacks += kl_callbacks
        if config.sigma_lr is not None:
            special_lrs.append((variances, config.sigma_lr))
    if adalora_tuner(model) is not None:
        losses.append(AdaLoraOrthogonality())
        callbacks.append(AdaLoraAllocation())
    if blora_tuner(model) is not None:
        losses.append(GatePenalty(config.gate_lambda, config.gate_cost))
        callbacks.append(GateSchedule(config.gate_warmup, config.gate_fix))
        special_lrs.append((gate_parameters(model), config.gate_lr))
    return combine_losses(losses), callbacks, special_lrs


def _short_name(name: str) -> str:
    return name.removeprefix("base_model.model.")


def learns_structure(model: nn.Module) -> bool:
    """Whether the adapter learns its ranks or bit-widths (B-LoRA, AdaLoRA)."""
    return blora_tuner(model) is not None or adalora_tuner(model) is not None


def structure_record(model: nn.Module) -> dict[str, Any]:
    """What a trained run's ``metrics.json`` adds: per-token ``bops`` (adapter, base, total and the 16-bit
    LoRA reference, with the convention) and the ``structure`` (rank and bits of every adapted matrix:
    learned by B-LoRA and AdaLoRA, as configured otherwise). Empty for models without adapter layers."""
    try:
        report = bops_report(model)
    except ValueError:
        return {}
    return {
        "bops": {key: value for key, value in report.items() if key != "layers"},
        "structure": {
            _short_name(layer["name"]): {"rank": layer["rank"], "bits": layer["bits"]} for layer in report["layers"]
        },
    }


def write_structure(model: nn.Module, run: Path, title: str = "") -> None:
    """``bops.json`` (per layer and in total) and ``structure.png`` (learned rank and bits heatmaps) of a run
    that learns its structure."""
    report = bops_report(model)
    for layer in report["layers"]:
        layer["name"] = _short_name(layer["name"])
    write_json_atomic(run / BOPS_FILE, report)
    save_structure_heatmap(run / STRUCTURE_PLOT, report["layers"], title)


def _write_config(path: Path, config: RunConfig) -> None:
    import yaml

    header = (
        "# bayeslora run configuration (resolved). Reproduce with:\n"
        f"#   bayeslora train --config {path} --output-dir <new dir>\n"
    )
    write_text_atomic(path, header + yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True))


def _resolve_samples(config: RunConfig, samples: int | None) -> int:
    """Posterior samples for an evaluation: 1 for zero-shot and deterministic methods."""
    if config.method == ZERO_SHOT:
        return 1
    return get_method(config.method).samples(samples if samples is not None else config.samples, config)


def _evaluate_and_write(
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
    n_samples = _resolve_samples(config, samples)
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
        **_prediction_options(config, n_samples),
    )
    record: dict[str, Any] = {
        "task": eval_task.name,
        "method": config.method,
        "model": config.model,
        "scoring": scorer.name,
        **({"cloze_normalization": config.cloze_normalization} if scorer.name == "cloze" else {}),
        **metrics,
        "limit": limit,
        "seed": config.seed,
        "run": str(run_dir),
        "task_source": eval_task.source,
    }
    if config.method != ZERO_SHOT:
        record.update(structure_record(model))
    if summary:
        record["train_task"] = train_task.name
        for key in ("steps", "trainable_params", "train_runtime_s", "step_time_s", "step_memory_mb", "peak_memory_mb"):
            if key in summary:
                record[key] = summary[key]
    out_dir = out_dir or eval_dir(run_dir, eval_task.name)
    title = f"{config.method} on {eval_task.name} ({scorer.name}, N={n_samples})"
    write_evaluation(out_dir, record, prediction, title)
    return record


ZERO_SHOT = "zero-shot"


def _prediction_options(config: RunConfig, n_samples: int) -> dict[str, Any]:
    """How the method's predictive distribution is drawn (see :func:`bayeslora.inference.predict`)."""
    if config.method == ZERO_SHOT:
        return {}
    prediction = get_method(config.method).prediction
    if prediction == "ensemble":
        return {"members": ensemble_members(config), "combine": config.ensemble_combine}
    if prediction == "dropout":
        return {"dropout": n_samples > 0}  # --samples 0: the network without dropout
    return {}


def _load_for(config: RunConfig, task: Task, *, progress: bool = True):
    """The base model and tokenizer of ``config`` with the head ``task`` needs."""
    return load_model(
        config.model,
        head=_head_for(task),
        num_labels=task.num_classes if task.kind == "classification" else None,
        num_layers=config.num_layers,
        dtype=config.dtype,
        trust_remote_code=config.trust_remote_code,
        progress=progress,
    )


def evaluate(
    run: str | Path | None = None,
    *,
    model: str | None = None,
    task: str | None = None,
    samples: int | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate a trained run (``run``) or a base model zero-shot (``model``); returns the metrics.

    Args:
        run: a run directory written by :func:`train`.
        model: instead of a run, a base model evaluated without adapter (method ``zero-shot``).
        task: evaluation task (default: the run's training task).
        samples: posterior samples (default: the method's; 0 = posterior mean for Bayesian methods).
        limit: evaluate on a fixed seeded subsample of this many examples.
        output_dir: the directory whose ``eval/<task>/`` receives the results (default: the run directory;
            for zero-shot ``runs/<model>-zero-shot``).
        overwrite: replace an existing ``eval/<task>/`` (refused otherwise).
        options: further RunConfig options, e.g. ``scoring``, ``num_layers``, ``max_length``.
    """
    if (run is None) == (model is None):
        raise ValueError("evaluate needs exactly one of a run directory or a base model")
    if run is not None:
        stored = read_run_config(run)
        config = make_config(**{**stored, **options})
        train_task = load_task(config.task)
        eval_task = train_task if task in (None, config.task) else load_task(task)
        _check_eval_task(train_task, eval_task)
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
    out_dir = eval_dir(base_dir, eval_task.name)
    if out_dir.exists() and not overwrite:
        raise RunExistsError(
            f"{out_dir} already holds an evaluation. Pass --overwrite to replace it, or --output-dir to write "
            f"elsewhere."
        )
    network, tokenizer = _load_for(config, train_task, progress=progress)
    summary = None
    if run is not None:
        network = load_adapter(network, Path(run) / ADAPTER_DIR)
        summary_path = Path(run) / TRAIN_SUMMARY
        summary = read_json(summary_path) if summary_path.is_file() else None
    network.eval()
    return _evaluate_and_write(
        network,
        tokenizer,
        config,
        train_task,
        eval_task,
        base_dir,
        summary,
        samples=samples,
        limit=limit,
        batch_size=batch_size,
        out_dir=out_dir,
        progress=progress,
    )


def export(run: str | Path, to: str, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Export the adapter of a run: ``to="lora"`` a plain PEFT LoRA adapter (B-LoRA truncated to its learned
    ranks and dequantized; the posterior mean of Me-LoRA and BLoB), ``to="packed"`` B-LoRA's integer codes at
    their learned bit-widths. Returns what was written and its size against the 16-bit LoRA adapter."""
    from .exporters import EXPORT_FORMATS, PACKED_WEIGHTS, export_lora, export_packed, reference_lora_bytes

    if to not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format '{to}': {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    if out.exists():
        raise RunExistsError(f"{out} already exists; choose another --out (exports never overwrite).")
    config = make_config(**read_run_config(run))
    task = load_task(config.task)
    network, _ = _load_for(config, task, progress=progress)
    network = load_adapter(network, Path(run) / ADAPTER_DIR)
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


#: Held-out training examples a temperature is fitted on, by default.
CALIBRATION_EXAMPLES = 200


def calibrate(
    run: str | Path,
    *,
    task: str | None = None,
    heldout: int = CALIBRATION_EXAMPLES,
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Temperature scaling of a trained run (post hoc, any method).

    One temperature T is fitted on ``heldout`` training examples the run never trained on (those that follow
    its ``--train-size`` subset in the same seeded order), predicted the way the method predicts (posterior
    samples, MC dropout, ensemble members). The saved predictions of every evaluation of the run (or of
    ``task``) are rescaled as softmax(log p / T) and written to ``eval/<task>-ts/`` as method
    ``<method>+ts``. Returns the new metrics records.
    """
    from .evaluation import load_predictions
    from .metrics import classification_metrics
    from .temperature import fit_temperature, scaled

    run = Path(run)
    config = make_config(**read_run_config(run))
    train_task = load_task(config.task)
    sources = [eval_dir(run, task)] if task else sorted(p.parent for p in (run / "eval").glob("*/metrics.json"))
    sources = [d for d in sources if not d.name.endswith("-ts")]
    if not sources or not all((d / "metrics.json").is_file() for d in sources):
        raise FileNotFoundError(
            f"{run} has no evaluation{' on ' + task if task else ''} to calibrate; run "
            f"`bayeslora eval --run {run}` first"
        )
    targets = [d.with_name(d.name + "-ts") for d in sources]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise RunExistsError(f"{', '.join(existing)} already exist(s). Pass --overwrite to replace.")
    examples = seeded_heldout(train_task.split("train"), config.train_size, heldout, DATA_SEED)
    network, tokenizer = _load_for(config, train_task, progress=progress)
    network = load_adapter(network, run / ADAPTER_DIR)
    n_samples = _resolve_samples(config, None)
    scorer = build_scorer(train_task, tokenizer, config, num_classes=train_task.num_classes)
    torch.manual_seed(config.seed)
    _, fitted_on = evaluate_model(
        network,
        scorer,
        examples,
        n_samples=n_samples,
        batch_size=config.eval_batch_size,
        progress=progress,
        **_prediction_options(config, n_samples),
    )
    temperature = fit_temperature(fitted_on.probs, fitted_on.labels)
    records = []
    for source, target in zip(sources, targets, strict=True):
        before = read_json(source / "metrics.json")
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
