"""What the pipeline's steps share: the base model and scorer of a run, its evaluation tasks, its ``config.yaml``,
and the warning about options its method does not use."""

from __future__ import annotations

import dataclasses
import gc
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..config import RunConfig, make_config, option_users
from ..evaluation.scoring import Scorer, make_scorer
from ..io import write_text_atomic
from ..methods import get_method
from ..models import load_model
from ..runs import ADAPTER_DIR, read_run_config
from ..runs.adapters import load_adapter
from ..runs.layout import CONFIG_HEADER
from ..tasks import Task, load_task


def head_for(task: Task) -> str:
    """The model head a task needs: ``classification`` or ``causal-lm``."""
    return "classification" if task.kind == "classification" else "causal-lm"


def resolved_scoring(task: Task, scoring: str | None) -> str:
    """The scoring a run uses for ``task``: ``classification``, ``completion`` (instruction data), or ``scoring`` (cloze
    by default)."""
    if task.kind == "classification":
        return "classification"
    if task.kind == "instruction":
        return "completion"
    return scoring or "cloze"


def check_eval_task(train_task: Task, eval_task: Task) -> None:
    """An evaluation task must fit the trained head."""
    if head_for(train_task) != head_for(eval_task):
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
        resolved_scoring(task, config.scoring),
        max_length=config.max_length,
        cloze_normalization=config.cloze_normalization,
        num_classes=num_classes,
        chat_template=config.chat_template,
    )


def load_base(config: RunConfig, task: Task, *, progress: bool = True):
    """The base model and tokenizer of ``config`` with the head ``task`` needs. The models of earlier runs in this
    process are collected first: a PEFT model and its trainer hold reference cycles, which only the cycle collector
    frees, so a process that trains run after run (the demo, a benchmark) would otherwise keep them until it runs
    (three load-and-release cycles of a run here: 55-170 MiB less resident after each collection)."""
    gc.collect()
    return load_model(
        config.model,
        head=head_for(task),
        num_labels=task.num_classes if task.kind == "classification" else None,
        num_layers=config.num_layers,
        dtype=config.dtype,
        trust_remote_code=config.trust_remote_code,
        progress=progress,
        quantization="4bit" if config.load_in_4bit else "8bit" if config.load_in_8bit else None,
    )


def load_eval_tasks(config: RunConfig, train_task: Task, names: Sequence[str]) -> list[Task]:
    """The evaluation tasks ``names`` of a run; its training task (``config.task``) is reused, not loaded again."""
    return [train_task if name == config.task else load_task(name) for name in names]


def write_config(path: Path, config: RunConfig) -> None:
    """``config.yaml`` of a run: the resolved options, with the command that reproduces the run. Of the
    method-specific options only those the run's method uses are written (a LoRA run records no gate options, whose
    defaults cannot change it: reading it back fills in each default)."""
    import yaml

    used = get_method(config.method).used_options(config)
    options = {key: value for key, value in config.to_dict().items() if key in used or option_users(key) is None}
    header = f"{CONFIG_HEADER} Reproduce with:\n#   bayeslora train --config {path} --output-dir <new dir>\n"
    write_text_atomic(path, header + yaml.safe_dump(options, sort_keys=False, allow_unicode=True))


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
    see :data:`~bayeslora.config.OPTION_GROUPS`), ``--samples`` where it means nothing."""
    method = get_method(config.method)
    used = method.used_options(config)
    unused = {option: who for option in given if option not in used and (who := option_users(option)) is not None}
    if "samples" in given and not method.accepts_samples(config):
        unused["samples"] = "the methods that average posterior samples"
    if unused:
        ignored = "; ".join(f"--{option.replace('_', '-')} is for {who}" for option, who in unused.items())
        warnings.warn(f"--method {config.method} ignores what it does not use: {ignored}.", stacklevel=3)


@dataclasses.dataclass
class LoadedRun:
    """A trained run ready to predict: its model (base and adapter, in evaluation mode), tokenizer, resolved options
    and training task."""

    model: object
    tokenizer: object
    config: RunConfig
    task: Task
    path: Path


def load_run(run: str | Path, *, progress: bool = True, **options) -> LoadedRun:
    """The model of a run directory written by ``bayeslora train``, its adapter loaded (refused on another base
    model unless ``force_base``); ``options`` override the run's loading and scoring options (dtype, max_length, ...).
    """
    config = make_config(**{**read_run_config(run), **options})
    task = load_task(config.task)
    model, tokenizer = load_base(config, task, progress=progress)
    model = load_adapter(model, Path(run) / ADAPTER_DIR, force=config.force_base)
    model.eval()
    return LoadedRun(model, tokenizer, config, task, Path(run))
