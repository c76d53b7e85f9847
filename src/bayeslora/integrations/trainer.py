"""Bayesian adapters in any Hugging Face ``Trainer``: :class:`BayesianTrainer` and :func:`bayesian_trainer`.

A Bayesian adapter's objective is not the task loss alone: Me-LoRA and BLoB minimise the negative ELBO per
example, ``task loss + β·KL(q || p) / N_train``, B-LoRA adds its gates' penalty, and their variance and gate
parameters train at their own learning rates. A plain ``transformers.Trainer`` (or TRL's ``SFTTrainer``) knows
none of this and would train the posterior's mean only, with nothing holding its variance to the prior. These
trainers add what the adapter's method adds in bayeslora's own loop (:meth:`bayeslora.methods.Method.
training_extras`) to whatever loss the wrapped trainer computes::

    from trl import SFTTrainer
    import bayeslora as bl

    trainer = bl.bayesian_trainer(SFTTrainer)(model=peft_model, args=sft_config, train_dataset=data)
    trainer.train()

The method is the one whose adapter the model holds (``MeLoraConfig`` → melora, ``BlobConfig`` → blob,
``BLoraConfig`` → blora, ``AdaLoraConfig`` → adalora), or ``method=`` names it; its options (``kl_weight``,
``kl_schedule``, ``sigma_lr``, ``gate_lambda``, ...; see ``bayeslora train --help``) come from ``method_options``
and otherwise take the defaults of ``bayeslora train``, while batch size, accumulation, learning rate and steps come
from the ``TrainingArguments``. N_train is the length of the training dataset as given (before a TRL trainer packs
it), or ``n_train=``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import cache
from typing import Any

from torch import nn
from transformers import Trainer, TrainingArguments

from ..config import RunConfig
from ..methods import Method, get_method
from ..methods.base import method_of_model
from ..training.losses import TrainingExtras, combine_losses
from ..training.trainer import ExtraTermsMixin
from ..tuners.base import BayesianLowRankModel

#: The RunConfig fields a Trainer's own arguments decide (the rest are the method's options).
_FROM_TRAINING_ARGUMENTS = ("batch_size", "grad_accum", "lr", "epochs", "max_steps", "weight_decay", "seed")


def method_config(
    method: Method, args: TrainingArguments, options: Mapping[str, Any] | RunConfig | None, model: nn.Module
) -> RunConfig:
    """The run options the method's training terms read: ``options`` (a whole :class:`RunConfig` is taken as it is;
    a mapping names method options over bayeslora's defaults), the adapter's own settings, and the loop's settings
    from ``args``. Unknown or out-of-range options raise ``ValueError`` naming them."""
    if isinstance(options, RunConfig):
        return options
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"Unknown method option(s) {', '.join(unknown)}. Method options are the fields of bayeslora.RunConfig "
            f"(the flags of `bayeslora train --help` with '_' for '-'), e.g. kl_weight, sigma_lr, gate_lambda."
        )
    looped = sorted(set(options) & set(_FROM_TRAINING_ARGUMENTS))
    if looped:
        raise ValueError(
            f"method_options {', '.join(looped)} are set by the TrainingArguments (per_device_train_batch_size, "
            f"gradient_accumulation_steps, learning_rate, num_train_epochs, max_steps, weight_decay, seed): set them "
            f"there."
        )
    peft_config = model.peft_config[model.active_adapter] if hasattr(model, "peft_config") else None
    config = RunConfig(
        method=method.name,
        batch_size=args.per_device_train_batch_size,
        grad_accum=args.gradient_accumulation_steps,
        lr=args.learning_rate,
        epochs=args.num_train_epochs,
        max_steps=args.max_steps if args.max_steps and args.max_steps > 0 else None,
        weight_decay=args.weight_decay,
        seed=args.seed,
        **(method.options_from_adapter(peft_config) if peft_config is not None else {}),
        **options,
    )
    config.validate()
    return method.resolve(config)


def _dataset_length(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # an IterableDataset
        return None


class BayesianTrainerMixin(ExtraTermsMixin):
    """What :func:`bayesian_trainer` adds to a Trainer class: the method's loss terms (added to the trainer's own loss
    in training mode, once per optimizer step whatever the accumulation), callbacks (run before the trainer's
    logging integrations, so that what they log is complete) and learning rates.

    Args (keyword only, besides the wrapped trainer's own):
        method: the method's name (see ``bayeslora methods``); default: the one whose adapter the model holds.
        method_options: its options (a mapping of :class:`~bayeslora.config.RunConfig` fields, or a whole
            ``RunConfig``).
        n_train: the number of training examples that the KL is divided by; default: ``len(train_dataset)``.
    """

    def __init__(
        self,
        *args,
        method: str | None = None,
        method_options: Mapping[str, Any] | RunConfig | None = None,
        n_train: int | None = None,
        **kwargs,
    ) -> None:
        given = kwargs.get("train_dataset")  # as given: a TRL trainer may pack it into fewer rows
        super().__init__(*args, **kwargs)
        model = self.model  # a TRL trainer given a peft_config has attached the adapter by now
        self.bayeslora_method = get_method(method) if method is not None else method_of_model(model)
        self.method_config: RunConfig | None = None
        if self.bayeslora_method is None:
            if method_options:
                raise ValueError(
                    "method_options were given but the model holds no adapter of a bayeslora method "
                    "(MeLoraConfig, BlobConfig, BLoraConfig, AdaLoraConfig): name it with method=..."
                )
            return
        if n_train is None:
            n_train = _dataset_length(given)
        if n_train is None or n_train <= 0:
            raise ValueError(
                f"{type(self).__name__}: the KL of a Bayesian adapter is divided by the number of training examples, "
                f"and this training dataset has no length (an iterable dataset?) or none: pass n_train=."
            )
        self.n_train = n_train
        self.method_config = method_config(self.bayeslora_method, self.args, method_options, model)
        extras = self.bayeslora_method.training_extras(model, self.method_config, n_train)
        self.extra_loss = combine_losses([*([self.extra_loss] if self.extra_loss else []), *extras.losses])
        self.special_lrs += extras.special_lrs
        self._insert_callbacks(extras)
        if extras:
            mark_regularised(model)

    def _insert_callbacks(self, extras: TrainingExtras) -> None:
        """The method's callbacks go after those that must run first (``runs_before_method_callbacks``, e.g. early
        stopping putting the best epoch back) and before all others: the Trainer's flow control and logging
        integrations then see what they add to a log line."""
        callbacks = self.callback_handler.callbacks
        first = [i for i, c in enumerate(callbacks) if getattr(c, "runs_before_method_callbacks", False)]
        position = first[-1] + 1 if first else 0
        callbacks[position:position] = extras.callbacks


def mark_regularised(model: nn.Module) -> None:
    """Tell the model's Bayesian tuner that its training adds the method's terms (no warning then)."""
    for module in model.modules():
        if isinstance(module, BayesianLowRankModel):
            module.mark_regularised()


@cache
def bayesian_trainer(cls: type[Trainer]) -> type[Trainer]:
    """``cls`` (a ``transformers.Trainer`` subclass, e.g. ``trl.SFTTrainer``) made into a trainer of Bayesian adapters:
    a subclass whose loss is ``cls``'s loss plus the adapter's method terms, with the method's callbacks and learning
    rates (see :class:`BayesianTrainerMixin` for the extra keyword arguments). The same class comes back for the same
    ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, Trainer)):
        raise TypeError(f"bayesian_trainer takes a transformers.Trainer subclass, got {cls!r}")
    if issubclass(cls, BayesianTrainerMixin):
        return cls
    if cls is Trainer:
        return BayesianTrainer
    return type(f"Bayesian{cls.__name__}", (BayesianTrainerMixin, cls), {"__module__": cls.__module__})


class BayesianTrainer(BayesianTrainerMixin, Trainer):
    """``transformers.Trainer`` with a Bayesian adapter's terms: the model's own loss (``outputs.loss``, e.g. the
    causal-LM loss of the label tokens) plus the KL, gate penalty, schedules and learning rates of its method. See
    :func:`bayesian_trainer` for any other Trainer class."""


__all__ = ["BayesianTrainer", "BayesianTrainerMixin", "bayesian_trainer", "method_config"]
