"""``bayeslora train``: fine-tune a model with a method's adapter on the transformers Trainer, save the adapter, then
evaluate it. Everything method-specific comes from the method (:mod:`bayeslora.methods`)."""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import transformers
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ..config import RunConfig, make_config
from ..evaluation.scoring import Scorer
from ..integrations import bayesian_trainer
from ..io import write_json_atomic
from ..methods import get_method
from ..reporting.structure import write_structure
from ..runs import ADAPTER_DIR, CONFIG_FILE, TRAIN_LOG, TRAIN_SUMMARY, RunExistsError, eval_dir, new_run_dir
from ..runs.adapters import attach_adapter, save_adapter, trainable_parameters
from ..runs.checkpoints import (
    CheckpointSeal,
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
from ..runs.model_card import write_model_card
from ..system import ResidentPeak, peak_memory_mb, versions
from ..tasks import DATA_SEED, HELDOUT_EXAMPLES, load_task, seeded_heldout, seeded_subset
from ..training import distributed
from ..training.callbacks import JsonlLogger, StepMemoryProbe, TermsProgress
from ..training.distributed import PerRankSeed, barrier, is_main_process, world
from ..training.early_stopping import EarlyStopping
from ..training.trainer import (
    BayesLoraTrainer,
    ExampleDataset,
    check_reporting,
    total_steps,
    training_arguments,
    warn_if_weight_decay_vanishes,
)
from .common import (
    build_scorer,
    check_eval_task,
    given_options,
    load_base,
    load_eval_tasks,
    resolved_scoring,
    warn_unused_options,
    write_config,
)
from .evaluate import evaluate_and_write, evaluate_out_of_distribution


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
    check_reporting(config.report_to)  # before anything heavy is loaded
    run_dir = config.resolved_output_dir()
    resuming = config.resume
    if resuming:  # the run's own configuration, before anything is resolved from it
        config = resume_point(config, run_dir)
    elif run_dir.exists() and not config.overwrite:  # fail before loading anything heavy
        raise RunExistsError(
            f"Run directory {run_dir} already exists. Choose another --output-dir, pass --overwrite to replace it "
            f"(the old run is kept until the new one finishes), or --resume to continue an unfinished run."
        )
    method = get_method(config.method)
    if not method.trains:
        raise ValueError(
            f"--method {config.method} trains nothing: evaluate a base model with `bayeslora eval --model NAME "
            f"--task TASK`, or choose a method that trains an adapter (see `bayeslora methods`)."
        )
    warn_unused_options(config, given_options(config))
    config = method.resolve(config)
    task = load_task(config.task)
    config = method.check_inputs(config, task)
    train_examples = seeded_subset(task.split("train"), config.train_size, DATA_SEED)
    if task.kind == "instruction" and config.early_stopping:
        raise ValueError("--early-stopping chooses the epoch by held-out class NLL; instruction data has no classes")
    heldout = None
    if config.early_stopping:  # the examples after the training subset in the same seeded order (an error if none)
        heldout = seeded_heldout(task.split("train"), config.train_size, HELDOUT_EXAMPLES, DATA_SEED)
    if config.train_size is not None and config.train_size > len(train_examples):
        warnings.warn(
            f"--train-size {config.train_size} is more than the {len(train_examples)} training examples of "
            f"'{config.task}': training on all of them.",
            stacklevel=2,
        )
    eval_names = config.eval_tasks if config.eval_tasks is not None else ([config.task] if task.heldout_eval else [])
    eval_tasks = load_eval_tasks(config, task, eval_names)
    ood_tasks = load_eval_tasks(config, task, config.ood_tasks or [])
    if ood_tasks and config.task not in eval_names:
        raise ValueError(
            "--ood-tasks are told apart from the training task's own evaluation examples: add the training task to "
            f"--eval-tasks (now {eval_names})."
        )
    for eval_task in [*eval_tasks, *ood_tasks]:
        check_eval_task(task, eval_task)
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
    members = method.members(config)

    def resumable(run: Path) -> bool:  # a failed new run with a checkpoint stays for --resume
        return any(steps_done(run, member) for member in members or [None])

    with new_run_dir(run_dir, config.overwrite, resumable) if creates else contextlib.nullcontext(run_dir) as run:
        barrier()  # the run directory exists from here on, for every process
        transformers.set_seed(config.seed)
        model, tokenizer = load_base(config, task, progress=progress)
        steps = total_steps(config, len(train_examples), processes=world()[1])
        model, targets = attach_adapter(model, config, task, steps, adapter_name=members[0] if members else "default")
        resolved = dataclasses.replace(
            config,
            target_modules=targets,
            scoring=None if task.kind != "multiple-choice" else resolved_scoring(task, config.scoring),
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
        with ResidentPeak(next(model.parameters()).device) as training_peak:  # this run's own peak
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
                    model,
                    member_config,
                    run,
                    train_examples,
                    scorer,
                    callbacks,
                    member,
                    checkpoint,
                    heldout=heldout,
                    progress=progress,
                )
                if member is not None and main:  # a resumed ensemble continues after it
                    save_trained_member(model, member, run, fit.record())
                fits.append(fit)
        model = next((fit.model for fit in reversed(fits) if fit.model is not None), model)  # as the Trainer left it
        if not main:
            return run_dir
        save_adapter(model, run / ADAPTER_DIR)
        after = method.after_training(model, config, scorer, task, train_examples, run)  # a post-hoc posterior
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
            "train_peak_memory_mb": round(training_peak.peak_mib, 1),
            "trainable_params": trainable_parameters(model) * len(fits),
            "total_params": sum(p.numel() for p in model.parameters()),
            "base_dtype": str(model.get_base_model().get_input_embeddings().weight.dtype).removeprefix("torch."),
            **after,
            **_early_stopping_summary(fits, members),
            "versions": versions(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json_atomic(run / TRAIN_SUMMARY, summary)
        if method.learns_structure:
            write_structure(model, run, title=f"{config.method} on {config.task}")
        for eval_task in eval_tasks:
            evaluate_and_write(model, tokenizer, resolved, task, eval_task, run, summary, progress=progress)
        if ood_tasks:
            evaluate_out_of_distribution(
                model, tokenizer, resolved, task, eval_dir(run, task.name), ood_tasks, run, summary, progress=progress
            )
        write_model_card(run)  # the method, the base, the task and the metrics, and how to load the adapter
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
    early_stopping: dict[str, Any] | None = None

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
            **({"early_stopping": self.early_stopping} if self.early_stopping else {}),
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
            early_stopping=record.get("early_stopping"),
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
    heldout: list | None = None,
    progress: bool,
) -> _Fit:
    """Train the model's active adapter with the transformers Trainer (the method's loss terms, callbacks
    and learning rates), from ``checkpoint`` if given; log lines go to ``train_log.jsonl``, tagged with the
    ensemble ``member``. With ``heldout`` examples, the best epoch on them is kept (see
    :mod:`bayeslora.training.early_stopping`)."""
    warn_if_weight_decay_vanishes_for(model, config)
    stopping = None
    if heldout is not None:
        patience, batch = config.early_stopping_patience, config.eval_batch_size
        stopping = EarlyStopping(scorer, heldout, patience, batch_size=batch, checkpoint=checkpoint)
    memory_probe = StepMemoryProbe()
    before_s = checkpoint_runtime(checkpoint) if checkpoint else 0.0
    args = training_arguments(config, checkpoint_folder(run, member), progress=progress)
    keep, args.save_total_limit = args.save_total_limit, None  # rotated by the seal, once the new one is whole
    trainer = bayesian_trainer(BayesLoraTrainer)(  # the method's terms, callbacks and learning rates
        model=model,
        args=args,
        train_dataset=ExampleDataset(train_examples),
        data_collator=scorer.collate,
        scorer=scorer,
        method=config.method,
        method_options=config,
        n_train=len(train_examples),
        callbacks=[
            *([stopping] if stopping else []),  # first: the best epoch is back before the others end training
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
    trainer.add_callback(CheckpointSeal(keep))  # last: after every other callback has saved into a checkpoint
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    return _Fit(
        trainer.model,
        output.global_step,
        output.training_loss,
        memory_probe.peak_mib,
        start_step=checkpoint_step(checkpoint) if checkpoint else 0,
        runtime_s=output.metrics.get("train_runtime", 0.0),
        before_s=before_s,
        early_stopping=stopping.record() if stopping else None,
    )


def _early_stopping_summary(fits: Sequence[_Fit], members: Sequence[str]) -> dict[str, Any]:
    """What the training summary records of early stopping: the choice of each adapter (a list for an ensemble)."""
    records = [fit.early_stopping for fit in fits if fit.early_stopping]
    if not records:
        return {}
    return {"early_stopping": records if members else records[0]}


def warn_if_weight_decay_vanishes_for(model: nn.Module, config: RunConfig) -> None:
    """Warn when AdamW's weight decay would round away on the model's trainable parameters (see
    :func:`~bayeslora.training.trainer.warn_if_weight_decay_vanishes`)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.weight_decay and trainable:
        warn_if_weight_decay_vanishes(config.lr, config.weight_decay, trainable[0].dtype)
