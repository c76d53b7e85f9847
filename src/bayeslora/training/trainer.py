"""Training through the transformers ``Trainer``: the task loss, extra loss terms, and logging.

No training loop of our own: gradient accumulation, scheduling, checkpointing, logging integrations and
distributed training come from the Trainer (and accelerate). What bayeslora adds is the loss, computed
from the scorer's class logits, ``loss = CE(class_logits, label) + Σ extra terms`` (the Bayesian
methods add their KL term through ``extra_loss``), a log line per logging step in ``train_log.jsonl``,
and a clear error when the loss stops being finite.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME

from ..evaluation.scoring import Scorer
from ..models import default_device
from ..tasks import Example
from ..tuners._peft_compat import pruned_ranks_allowed
from .losses import ExtraLoss


class ExampleDataset(Dataset):
    """A list of task examples; the scorer's ``collate`` turns a list of them into a batch."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


class NonFiniteLossError(FloatingPointError):
    """The loss (or one of its terms) became NaN or infinite."""


class ExtraTermsMixin:
    """Adds extra loss terms and per-parameter learning rates to any ``transformers.Trainer`` subclass (put it first
    among the bases): ``loss = task loss + Σ extra terms``, where the task loss is whatever the trainer computes
    (:meth:`task_loss`, by default the base class's ``compute_loss``).

    The extra terms are computed once per micro-batch in training mode only (an evaluation loss is the task loss), and
    weighted so that one optimizer step adds each once: the Trainer divides the loss of every micro-batch by the
    gradient-accumulation steps unless the task loss is already normalised over the whole accumulated batch (a model
    that accepts ``num_items_in_batch``, as TRL's trainers and causal LMs do); then the terms are divided here. The
    running means of the task loss (``nll``) and of every term are added to each log line, and a loss that is not
    finite stops training with :class:`NonFiniteLossError` naming the terms.

    Args:
        extra_loss: further loss terms (the KL of Bayesian adapters).
        special_lrs: learning rates for particular parameters, ``[(parameters, lr), ...]`` (the variance
            parameters of Bayesian adapters); they get no weight decay.
    """

    def __init__(
        self,
        *args,
        extra_loss: ExtraLoss | None = None,
        special_lrs: Sequence[tuple[Sequence[nn.Parameter], float]] = (),
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.extra_loss = extra_loss
        self.special_lrs = list(special_lrs)
        self._running: dict[str, list[float]] = defaultdict(list)

    def create_optimizer(self, *args, **kwargs):
        """The Trainer's optimizer, with extra parameter groups for :attr:`special_lrs`. (transformers 5.0 calls it
        without arguments, later releases with the model: both are passed through.)"""
        model = args[0] if args else kwargs.get("model")
        if self.optimizer is None and self.special_lrs:
            opt_model = self.model if model is None else model
            special = {id(p) for params, _ in self.special_lrs for p in params}
            decay = set(self.get_decay_parameter_names(opt_model))
            rest = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad and id(p) not in special]
            groups = [
                {"params": [p for n, p in rest if n in decay], "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in rest if n not in decay], "weight_decay": 0.0},
            ]
            groups += [{"params": list(params), "lr": lr, "weight_decay": 0.0} for params, lr in self.special_lrs]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
        return super().create_optimizer(*args, **kwargs)

    def task_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """The loss the extra terms are added to: the base trainer's ``compute_loss``."""
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _accumulation_share(self, num_items_in_batch) -> float:
        """1 / accumulation steps if the task loss of a micro-batch is already that micro-batch's share of the
        accumulated batch's loss (the Trainer then does not divide it), else 1 (the Trainer divides)."""
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:  # as transformers' training_step decides it
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        return 1.0 / steps if scaled else 1.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The task loss plus, in training mode, the extra terms (see the class docstring for their weight)."""
        result = self.task_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        if not model.training:
            return result
        share = self._accumulation_share(num_items_in_batch)
        terms = {"nll": loss}
        logs: dict[str, float] = {}
        if self.extra_loss is not None:
            extra = self.extra_loss(model, self)
            terms.update({name: value * share for name, value in extra.terms.items()})
            logs.update(extra.logs)
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            bad = [name for name, value in terms.items() if not torch.isfinite(value)]
            raise NonFiniteLossError(
                f"The training loss became {loss.item()} at step {self.state.global_step} "
                f"(non-finite term(s): {', '.join(bad)}). Lower --lr, check the inputs, or for Bayesian "
                f"methods widen the prior / shrink the initial σ.{self._checkpoint_hint()}"
            )
        for name, value in terms.items():  # logged per optimizer step, as the terms are meant
            self._running[name].append(float(value.detach()) / share)
        for name, value in logs.items():
            self._running[name].append(value)
        return (loss, outputs) if return_outputs else loss

    def _checkpoint_hint(self) -> str:
        """Where the checkpoints saved before a failure are, if any were saved."""
        if self.args.save_strategy == "no":
            return ""
        return f" The checkpoints saved before this step are kept in {self.args.output_dir}."

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the running means of the loss terms to the Trainer's log line."""
        if "loss" in logs and self._running:
            for name, values in self._running.items():
                logs[name] = sum(values) / len(values)
            self._running.clear()
        super().log(logs, *args, **kwargs)


class BayesLoraTrainer(ExtraTermsMixin, Trainer):
    """bayeslora's own ``Trainer``: the task loss is the cross-entropy of the scorer's class logits, averaged over the
    batch; the method's terms come on top (:class:`ExtraTermsMixin`; the command line trains through
    ``bayeslora.bayesian_trainer(BayesLoraTrainer)``, which adds them for the run's method).

    Args:
        scorer: turns batches into class logits.
    """

    loss_is_scaled_for_ga = False  # the task loss is a per-batch mean

    def __init__(self, *args, scorer: Scorer, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scorer = scorer

    def task_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """The scorer's training loss: ``CE(class_logits, labels)`` averaged over the batch, or for instruction data
        the mean NLL of the completion tokens."""
        loss, logits = self.scorer.training_loss(model, inputs)
        return (loss, {"logits": logits}) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints hold the adapter only. (PEFT's default adds the base model's embedding matrices when
        ``lm_head`` is adapted, ~30x the adapter's size for SmolLM2, though training never changes them.)
        Every process that the Trainer's own ``_save`` would use takes part, the main one writes."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        joins = self.args.should_save or getattr(self, "is_distributed_loading_by_transformers", False)
        if not isinstance(model, PeftModel) or not joins:
            super()._save(output_dir, state_dict)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
        with pruned_ranks_allowed(model):
            model.save_pretrained(
                output_dir, state_dict=state_dict, is_main_process=self.args.should_save, save_embedding_layers=False
            )
        if self.args.should_save:
            torch.save(self.args, Path(output_dir) / TRAINING_ARGS_NAME)


def warn_if_weight_decay_vanishes(lr: float, weight_decay: float, dtype: torch.dtype) -> None:
    """Warn when AdamW's weight decay cannot change a weight of ``dtype``.

    Decoupled decay multiplies every weight by ``1 − lr·wd`` each step (the peak ``lr``; warm-up and decay
    only lower it). The representable number nearest to that factor is exactly 1 when ``lr·wd`` is below
    a quarter of the dtype's machine epsilon (half the spacing below 1): in float32 below 2^-25 ≈ 3.0e-8, so
    MAP's weight decay 1e-5 at a learning rate of 5e-4 (5e-9) leaves every weight as it is."""
    if weight_decay <= 0 or not dtype.is_floating_point:
        return
    threshold = torch.finfo(dtype).eps / 4
    if lr * weight_decay < threshold:
        warnings.warn(
            f"--weight-decay {weight_decay:g} at --lr {lr:g}: AdamW multiplies every weight by 1 - lr*wd = "
            f"1 - {lr * weight_decay:.1e} per step, which is exactly 1 in {str(dtype).removeprefix('torch.')} "
            f"(below {threshold:.1e} it rounds to 1), so the weight decay changes nothing and the run trains "
            f"what it would without it. For an effect, raise --weight-decay to at least "
            f"{threshold / lr:.1e} at this learning rate.",
            stacklevel=2,
        )


#: The extra of bayeslora that installs an integration's package, where there is one.
REPORTING_EXTRAS = {"tensorboard": "bayeslora[tensorboard]"}


def check_reporting(report_to: Sequence[str]) -> None:
    """Raise ``ValueError`` (before anything is loaded) naming a ``--report-to`` integration that transformers does
    not know or whose package is not installed, and how to fix it."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    available = set(get_available_reporting_integrations())
    for name in report_to:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise ValueError(
                f"--report-to {name}: unknown; choose from none, all, {', '.join(INTEGRATION_TO_CALLBACK)}"
            )
        if name not in available:
            package = REPORTING_EXTRAS.get(name, name)
            raise ValueError(
                f"--report-to {name}: its package is not installed. pip install '{package}', or leave --report-to out."
            )


def training_arguments(config, output_dir: Path, *, progress: bool = True) -> TrainingArguments:
    """The ``TrainingArguments`` of a :class:`~bayeslora.config.RunConfig`: AdamW, linear warm-up then linear
    decay, seeded; a checkpoint every ``save_steps`` steps (the last ``save_total_limit`` kept) if asked."""
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        weight_decay=config.weight_decay or 0.0,
        warmup_steps=config.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type="linear",
        max_steps=config.max_steps or -1,
        num_train_epochs=config.epochs,
        max_grad_norm=config.max_grad_norm,
        optim="adamw_torch",
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=config.save_total_limit,
        report_to=config.report_to,
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=default_device().type == "cpu",  # also what makes several CPU processes train together (gloo)
        disable_tqdm=not progress,
    )


def total_steps(config, n_train: int, processes: int = 1) -> int:
    """The optimizer steps a run takes, as the Trainer counts them: ``--max-steps``, else
    ⌈epochs · max(1, ⌈⌈N_train / P⌉ / batch⌉ // accumulation)⌉ for P processes (the distributed sampler gives each
    ⌈N_train / P⌉ examples per epoch)."""
    if config.max_steps:
        return config.max_steps
    per_process = math.ceil(n_train / processes)
    per_epoch = max(1, math.ceil(per_process / config.batch_size) // config.grad_accum)
    return math.ceil(config.epochs * per_epoch)
