"""The Python API, mirroring the CLI: ``train`` a run, ``evaluate`` a run (or a base model zero-shot).

import bayeslora as bl

run = bl.train(model="smollm2-135m", task="arc-easy", method="lora", max_steps=100, batch_size=4,
               lr=3e-4, output_dir="runs/arc-lora")
metrics = bl.evaluate(run, task="obqa", limit=200)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from . import distributed
from .adapters import attach_adapter, ensemble_members, load_adapter, save_adapter, trainable_parameters
from .baselines.adalora import AdaLoraAllocation, AdaLoraOrthogonality, adalora_tuner
from .baselines.laplace import KronLaplace, resolve_prior
from .config import RunConfig, make_config
from .distributed import PerRankSeed, barrier, is_main_process
from .evaluation import eval_examples, evaluate_model, write_evaluation
from .gating import GatePenalty, GateSchedule, blora_tuner, gate_parameters, warn_if_gates_cannot_close
from .io import read_json, write_json_atomic, write_text_atomic
from .methods import get_method, option_users
from .models import load_model
from .objectives import bayesian_objective, variance_parameters
from .resume import (
    RuntimeLedger,
    checkpoint_folder,
    checkpoint_runtime,
    checkpoint_step,
    last_complete_checkpoint,
    load_trained_member,
    resume_point,
    save_trained_member,
    steps_done,
    trained_member,
    truncate_log,
)
from .runs import (
    ADAPTER_DIR,
    CONFIG_FILE,
    LAPLACE_FILE,
    TRAIN_LOG,
    TRAIN_SUMMARY,
    RunExistsError,
    eval_dir,
    new_run_dir,
    read_run_config,
)
from .scoring import Scorer, make_scorer
from .structure import learns_structure, structure_record, write_structure
from .system import peak_memory_mb, versions
from .tasks import DATA_SEED, HELDOUT_EXAMPLES, Task, load_task, seeded_heldout, seeded_subset
from .training import (
    BayesLoraTrainer,
    ExampleDataset,
    JsonlLogger,
    StepMemoryProbe,
    TermsProgress,
    combine_losses,
    training_arguments,
    warn_if_weight_decay_vanishes,
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
    is refused if it exists, unless ``overwrite`` (see :func:`bayeslora.runs.new_run_dir`) or ``resume``
    (continue the unfinished run there from its last checkpoint, see :func:`resume_point`).
    """
    if config is None:
        config = make_config(recipe, **overrides)
    elif recipe or overrides:
        raise ValueError("pass either a RunConfig or recipe/overrides, not both")
    config.validate()
    run_dir = config.resolved_output_dir()
    resuming = config.resume
    if resuming:  # the run's own configuration, before anything is resolved from it
        config = resume_point(config, run_dir)
    elif run_dir.exists() and not config.overwrite:  # fail before loading anything heavy
        raise RunExistsError(
            f"Run directory {run_dir} already exists. Choose another --output-dir, pass --overwrite to replace it "
            f"(the old run is kept until the new one finishes), or --resume to continue an unfinished run."
        )
    warn_unused_options(config, given_options(config))
    config = get_method(config.method).resolve(config)
    task = load_task(config.task)
    config = check_method_inputs(config, task)
    train_examples = seeded_subset(task.split("train"), config.train_size, DATA_SEED)
    if config.train_size is not None and config.train_size > len(train_examples):
        warnings.warn(
            f"--train-size {config.train_size} is more than the {len(train_examples)} training examples of "
            f"'{config.task}': training on all of them.",
            stacklevel=2,
        )
    eval_names = config.eval_tasks if config.eval_tasks is not None else ([config.task] if task.heldout_eval else [])
    eval_tasks = load_eval_tasks(config, task, eval_names)
    for eval_task in eval_tasks:
        _check_eval_task(task, eval_task)
        if not task.heldout_eval and eval_task.name == task.name:
            warnings.warn(
                f"--eval-tasks includes the training file '{task.name}' itself: its evaluation holds the "
                f"{len(train_examples)} examples trained on, so it measures fit, not generalisation. Evaluate on a "
                f"separate file (or a registered task with its own validation split) for held-out numbers.",
                stacklevel=2,
            )

    distributed.start()
    main = is_main_process()  # on several processes, only the main one writes (see bayeslora.distributed)
    creates = main and not resuming
    members = ensemble_members(config)

    def resumable(run: Path) -> bool:  # a failed new run with a checkpoint stays for --resume
        return any(steps_done(run, member) for member in members or [None])

    with new_run_dir(run_dir, config.overwrite, resumable) if creates else contextlib.nullcontext(run_dir) as run:
        barrier()  # the run directory exists from here on, for every process
        transformers.set_seed(config.seed)
        model, tokenizer = load_base(config, task, progress=progress)
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
        if main and not resuming:
            write_config(run / CONFIG_FILE, resolved)
        if main and resuming:
            truncate_log(run / TRAIN_LOG, run)
        scorer = build_scorer(task, tokenizer, config)
        fits = []
        for index, member in enumerate(members or [None]):
            seed = config.seed + index  # ensemble members differ by initialisation and data order
            if member is not None:
                if index > 0:
                    transformers.set_seed(seed)
                    model.add_adapter(member, model.peft_config[members[0]])
                model.set_adapter(member)
            if resuming and member is not None and trained_member(run, member):
                fits.append(_Fit.recorded(load_trained_member(model, member, run)))
                continue
            checkpoint = last_complete_checkpoint(checkpoint_folder(run, member)) if resuming else None
            member_config = dataclasses.replace(config, seed=seed)
            fit = _fit(
                model, member_config, run, train_examples, scorer, callbacks, member, checkpoint, progress=progress
            )
            if member is not None and main:  # a resumed ensemble continues after it
                save_trained_member(model, member, run, fit.record())
            fits.append(fit)
        model = next((fit.model for fit in reversed(fits) if fit.model is not None), model)  # as the Trainer left it
        if not main:
            return run_dir
        save_adapter(model, run / ADAPTER_DIR)
        laplace = {}
        if get_method(config.method).prediction == "laplace":
            laplace = fit_laplace(model, config, scorer, task, train_examples, run)
        device = next(model.parameters()).device
        runtime = sum(fit.runtime_s for fit in fits)  # of this process only
        steps_total = sum(fit.global_step for fit in fits)
        steps_before = sum(fit.start_step for fit in fits)  # done before an interruption
        steps_run = steps_total - steps_before  # the steps of that runtime
        unmeasured = sum(fit.start_step for fit in fits if fit.before_s is None)  # by a session that kept no time
        summary = {
            "task": config.task,
            "method": config.method,
            "model": config.model,
            "task_source": task.source,
            "train_examples": len(train_examples),
            "steps": steps_total,
            **({"ensemble_members": len(members)} if members else {}),
            "train_loss": sum(fit.training_loss for fit in fits) / len(fits),
            "train_runtime_s": round(sum(fit.total_runtime_s for fit in fits), 2),
            **({"train_runtime_unmeasured_steps": unmeasured} if unmeasured else {}),
            **({"resumed_from_step": steps_before} if resuming else {}),
            "step_time_s": round(runtime / max(1, steps_run), 3),
            "step_memory_mb": None if fits[0].step_memory_mib is None else round(fits[0].step_memory_mib, 1),
            "peak_memory_mb": round(peak_memory_mb(device), 1),
            "trainable_params": trainable_parameters(model) * len(fits),
            "total_params": sum(p.numel() for p in model.parameters()),
            **laplace,
            "versions": versions(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json_atomic(run / TRAIN_SUMMARY, summary)
        if learns_structure(model):
            write_structure(model, run, title=f"{config.method} on {config.task}")
        for eval_task in eval_tasks:
            evaluate_and_write(model, tokenizer, resolved, task, eval_task, run, summary, progress=progress)
    return run_dir


@dataclasses.dataclass
class _Fit:
    """What training one adapter left: the model as the Trainer left it (None for an ensemble member loaded
    from its record), its steps (``start_step`` of them done before an interruption in ``before_s`` seconds,
    None if that time was not recorded; the others in ``runtime_s`` seconds by this process), mean training
    loss and one step's memory."""

    model: nn.Module | None
    global_step: int
    training_loss: float
    step_memory_mib: float | None
    start_step: int = 0
    runtime_s: float = 0.0
    before_s: float | None = 0.0

    @property
    def total_runtime_s(self) -> float:
        """The training time of all the sessions that trained this adapter, as far as it was recorded."""
        return (self.before_s or 0.0) + self.runtime_s

    def record(self) -> dict[str, Any]:
        """What a trained ensemble member's record keeps (see :func:`bayeslora.resume.save_trained_member`)."""
        return {
            "global_step": self.global_step,
            "training_loss": self.training_loss,
            "step_memory_mib": self.step_memory_mib,
            "runtime_s": None if self.before_s is None else self.total_runtime_s,
        }

    @classmethod
    def recorded(cls, record: dict[str, Any]) -> _Fit:
        """The fit of a member trained before an interruption: all its steps done before, none run here."""
        return cls(
            None,
            record["global_step"],
            record["training_loss"],
            record["step_memory_mib"],
            start_step=record["global_step"],
            before_s=record.get("runtime_s"),  # None in the records of older bayeslora versions
        )


def _fit(
    model: nn.Module,
    config: RunConfig,
    run: Path,
    train_examples: list,
    scorer: Scorer,
    callbacks: Sequence[TrainerCallback],
    member: str | None,
    checkpoint: Path | None = None,
    *,
    progress: bool,
) -> _Fit:
    """Train the model's active adapter with the transformers Trainer (the method's loss terms, callbacks
    and learning rates), from ``checkpoint`` if given; log lines go to ``train_log.jsonl``, tagged with the
    ensemble ``member``."""
    extra_loss, objective_callbacks, special_lrs = training_extras(model, config, len(train_examples))
    memory_probe = StepMemoryProbe()
    before_s = checkpoint_runtime(checkpoint) if checkpoint else 0.0
    trainer = BayesLoraTrainer(
        model=model,
        args=training_arguments(config, checkpoint_folder(run, member), progress=progress),
        train_dataset=ExampleDataset(train_examples),
        data_collator=scorer.collate,
        scorer=scorer,
        extra_loss=extra_loss,
        special_lrs=special_lrs,
        callbacks=[
            *objective_callbacks,
            *callbacks,
            memory_probe,
            # a checkpoint whose earlier time is unknown passes the gap on: it records no time either
            *([RuntimeLedger(before_s)] if before_s is not None else []),
            PerRankSeed(),
            JsonlLogger(run / TRAIN_LOG, {"member": member} if member else None),
        ],
    )
    if progress:  # the progress bar also shows the loss terms
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(TermsProgress())
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    return _Fit(
        trainer.model,
        output.global_step,
        output.training_loss,
        memory_probe.peak_mib,
        start_step=checkpoint_step(checkpoint) if checkpoint else 0,
        runtime_s=output.metrics.get("train_runtime", 0.0),
        before_s=before_s,
    )


def load_eval_tasks(config: RunConfig, train_task: Task, names: Sequence[str]) -> list[Task]:
    """The evaluation tasks ``names`` of a run; its training task (``config.task``) is reused, not loaded again."""
    return [train_task if name == config.task else load_task(name) for name in names]


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
    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.weight_decay and trainable:
        warn_if_weight_decay_vanishes(config.lr, config.weight_decay, trainable[0].dtype)
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
        schedule = GateSchedule(config.gate_warmup, config.gate_fix)
        initial_logit = min(config.rank_gate_init, config.bit_gate_init)
        steps = total_steps(config, n_train)
        warn_if_gates_cannot_close(schedule, steps, config.gate_lr, initial_logit, config.gate_temperature)
        losses.append(GatePenalty(config.gate_lambda, config.gate_cost))
        callbacks.append(schedule)
        special_lrs.append((gate_parameters(model), config.gate_lr))
    return combine_losses(losses), callbacks, special_lrs


def write_config(path: Path, config: RunConfig) -> None:
    """``config.yaml`` of a run: the resolved options, with the command that reproduces the run."""
    import yaml

    header = (
        "# bayeslora run configuration (resolved). Reproduce with:\n"
        f"#   bayeslora train --config {path} --output-dir <new dir>\n"
    )
    write_text_atomic(path, header + yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True))


def resolve_samples(config: RunConfig, samples: int | None) -> int:
    """Posterior samples for an evaluation: 1 for zero-shot and deterministic methods."""
    if config.method == ZERO_SHOT:
        return 1
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
    n_samples = resolve_samples(config, samples)
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
        **prediction_options(config, n_samples, run_dir),
    )
    record: dict[str, Any] = {
        "task": eval_task.name,
        "method": config.method,
        "model": config.model,
        "scoring": scorer.name,
        **({"cloze_normalization": config.cloze_normalization} if scorer.name == "cloze" else {}),
        **predictive_record(config),
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
        for key in SUMMARY_KEYS_IN_METRICS:
            if key in summary:
                record[key] = summary[key]
    out_dir = out_dir or eval_dir(run_dir, eval_task.name)
    title = f"{config.method} on {eval_task.name} ({scorer.name}, N={n_samples})"
    write_evaluation(out_dir, record, prediction, title)
    return record


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
    "peak_memory_mb",
)


def prediction_options(config: RunConfig, n_samples: int, run_dir: Path | None = None) -> dict[str, Any]:
    """How the method's predictive distribution is drawn (see :func:`bayeslora.inference.predict`); a
    Laplace run's posterior is read from ``run_dir``."""
    if config.method == ZERO_SHOT:
        return {}
    prediction = get_method(config.method).prediction
    if prediction == "ensemble":
        return {"members": ensemble_members(config), "combine": config.ensemble_combine}
    if prediction == "dropout":
        return {"dropout": n_samples > 0}  # --samples 0: the network without dropout
    if prediction == "laplace" and n_samples > 0:  # --samples 0: the trained LoRA (the posterior mode)
        if run_dir is None or not (Path(run_dir) / LAPLACE_FILE).is_file():
            raise FileNotFoundError(f"{run_dir} holds no Laplace posterior ({LAPLACE_FILE}); train the run again")
        laplace = KronLaplace.load(Path(run_dir) / LAPLACE_FILE)
        return {
            "sampler": functools.partial(
                laplace.predict_batch, predictive=config.laplace_predictive, n_samples=n_samples
            )
        }
    return {}


#: The options that decide how a trained run predicts, by the method's kind of prediction
#: (``bayeslora eval`` can change them; an evaluation records the ones it used).
PREDICTIVE_OPTIONS = {"ensemble": ("ensemble_combine",), "laplace": ("laplace_predictive",)}


def given_options(config: RunConfig) -> list[str]:
    """The options of ``config`` that someone chose: those that differ from both the library's default and
    the default ``config``'s method fills in (a resumed run's ``config.yaml`` holds the latter)."""
    defaults = RunConfig()
    method_defaults = get_method(config.method).resolve(defaults)
    return [
        f.name
        for f in dataclasses.fields(config)
        if getattr(config, f.name) not in (getattr(defaults, f.name), getattr(method_defaults, f.name))
    ]


def warn_unused_options(config: RunConfig, given: Iterable[str]) -> None:
    """Warn about the options in ``given`` (set by the user) that ``config``'s method does not use: another
    method's options (an ensemble's or a Laplace posterior's, Me-LoRA's core, a posterior's, B-LoRA's gates;
    see :data:`~bayeslora.methods.OPTION_GROUPS`), ``--samples`` on a deterministic method."""
    method = None if config.method == ZERO_SHOT else get_method(config.method)
    used = method.used_options(config) if method is not None else set()
    unused = {option: who for option in given if option not in used and (who := option_users(option)) is not None}
    deterministic = method is None or not method.is_stochastic(config)
    if "samples" in given and deterministic and (method is None or method.prediction != "ensemble"):
        unused["samples"] = "the methods that average posterior samples"
    if unused:
        ignored = "; ".join(f"--{option.replace('_', '-')} is for {who}" for option, who in unused.items())
        warnings.warn(f"--method {config.method} ignores what it does not use: {ignored}.", stacklevel=3)


def predictive_record(config: RunConfig) -> dict[str, Any]:
    """How ``config``'s method predicts beyond its number of samples, as an evaluation records it: an
    ensemble's ``ensemble_combine``, a Laplace posterior's ``laplace_predictive``; {} for other methods."""
    if config.method == ZERO_SHOT:
        return {}
    return {key: getattr(config, key) for key in PREDICTIVE_OPTIONS.get(get_method(config.method).prediction, ())}


def check_method_inputs(config: RunConfig, task: Task) -> RunConfig:
    """``config`` checked against what its method needs, before anything is trained: MC dropout samples the
    adapters' dropout, so it needs some; a Laplace posterior's prior rule is resolved against ``task``'s
    training split (``auto`` becomes ``heldout`` or ``marglik``, see :func:`resolve_prior`), so that
    ``config.yaml`` records the rule used and a held-out prior with no held-out examples is refused now."""
    method = get_method(config.method)
    if method.prediction == "dropout" and not config.dropout:
        raise ValueError(
            f"--method {config.method} averages predictions over the adapters' dropout masks, and --dropout "
            f"{config.dropout} leaves nothing to sample: set --dropout above 0 (0.1 by default), or train "
            f"--method lora for the deterministic adapter."
        )
    if method.prediction == "laplace":
        prior = resolve_prior(config.laplace_prior, len(task.split("train")), config.train_size)
        config = dataclasses.replace(config, laplace_prior=prior)
    return config


def fit_laplace(model: nn.Module, config: RunConfig, scorer: Scorer, task: Task, train_examples: list, run: Path):
    """Fit the K-FAC Laplace posterior of a trained LoRA on its training examples, choose the prior precision
    (marginal likelihood, or held-out training examples), save it as ``laplace.safetensors``; returns what
    the training summary records."""
    started = time.perf_counter()
    laplace = KronLaplace.fit(
        model, scorer, train_examples, subset=config.laplace_subset, batch_size=config.batch_size, seed=config.seed
    )
    split = task.split("train")
    prior = resolve_prior(config.laplace_prior, len(split), config.train_size)
    if prior == "heldout":
        heldout = seeded_heldout(split, config.train_size, HELDOUT_EXAMPLES, DATA_SEED)
        laplace.select_prior_precision_on(model, scorer, heldout, batch_size=config.batch_size)
    else:
        laplace.optimize_prior_precision()
    laplace.save(run / LAPLACE_FILE)
    return {
        "laplace_prior": prior,
        "laplace_prior_precision": laplace.prior_precision,
        "laplace_params": laplace.num_params,
        "laplace_fit_s": round(time.perf_counter() - started, 2),
    }


def load_base(config: RunConfig, task: Task, *, progress: bool = True):
    """The base model and tokenizer of ``config`` with the head ``task`` needs."""
    return load_model(
        config.model,
        head=_head_for(task),
        num_labels=task.num_classes if task.kind == "classification" else None,
        num_layers=config.num_layers,
        dtype=config.dtype,
        trust_remote_code=config.trust_remote_code,
        progress=progress,
        quantization="4bit" if config.load_in_4bit else "8bit" if config.load_in_8bit else None,
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
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be positive (a number of evaluation examples), got {limit}")
    if run is not None:
        stored = read_run_config(run)
        config = make_config(**{**stored, **options})
        warn_unused_options(config, [*options, *(["samples"] if samples is not None else [])])
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
    network, tokenizer = load_base(config, train_task, progress=progress)
    summary = None
    if run is not None:
        network = load_adapter(network, Path(run) / ADAPTER_DIR, force=config.force_base)
        summary_path = Path(run) / TRAIN_SUMMARY
        summary = read_json(summary_path) if summary_path.is_file() else None
    network.eval()
    return evaluate_and_write(
        network,
        tokenizer,
        config,
        train_task,
        eval_task,
        Path(run) if run is not None else base_dir,  # where the run's own files are (a Laplace posterior)
        summary,
        samples=samples,
        limit=limit,
        batch_size=batch_size,
        out_dir=out_dir,
        progress=progress,
    )
