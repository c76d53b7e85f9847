"""What a method is, as a plug-in: the :class:`Method` base class and the registry of ``--method`` names.

A method declares, in its own module under ``bayeslora/methods/``, everything that makes it what it is: the PEFT
config of its adapter, the option groups it uses and the defaults it fills in, the loss terms, callbacks and
learning rates it adds to training, how its predictive distribution is drawn (posterior samples, dropout masks,
ensemble members, a post-hoc posterior), and the checks its inputs must pass. The pipeline (train, evaluate,
calibrate) asks the method and never tests its name. Adding a method: a module that subclasses :class:`Method`
and calls :func:`register_method`, and one import line in ``bayeslora/methods/__init__.py`` (or, outside the
package, the call alone: a registered method works with ``bayeslora.train`` and the CLI alike).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from ..config import OPTION_GROUPS
from ..training.losses import TrainingExtras

if TYPE_CHECKING:
    from peft import PeftConfig

    from ..config import RunConfig
    from ..evaluation.scoring import Scorer
    from ..tasks import Task


class Method:
    """A fine-tuning method. Subclasses set the class attributes and override the hooks that differ.

    Attributes:
        name: the ``--method`` value.
        description: one line for ``bayeslora methods`` and reports.
        option_groups: the groups of method-specific options it uses (:data:`~bayeslora.config.OPTION_GROUPS`);
            override :meth:`groups` where an option decides them.
        option_defaults: values of :class:`~bayeslora.config.RunConfig` options it sets when the user leaves them
            unset (``None``), e.g. its prior; see :meth:`resolve`.
        default_samples: samples averaged at evaluation when ``--samples`` is not given (stochastic methods).
        learns_structure: whether its adapter learns ranks or bit-widths (a run then writes ``bops.json`` and
            ``structure.png``).
        predictive_options: the options that decide how a trained run predicts (``bayeslora eval`` can change
            them; an evaluation records the ones it used).
        trains: whether it trains an adapter (the ``zero-shot`` evaluation of a base model does not).
        peft_type: the PEFT type of the adapter that makes a model this method's (``model.peft_config[name].
            peft_type``), for methods whose adapter is theirs alone; :func:`method_of_model` reads it when a model
            is trained outside bayeslora's own loop (``bayeslora.BayesianTrainer``).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    option_groups: ClassVar[tuple[str, ...]] = ()
    option_defaults: ClassVar[Mapping[str, Any]] = {}
    default_samples: ClassVar[int] = 1
    learns_structure: ClassVar[bool] = False
    predictive_options: ClassVar[tuple[str, ...]] = ()
    trains: ClassVar[bool] = True
    peft_type: ClassVar[str | None] = None

    # --- the adapter ---
    def peft_config(self, config: RunConfig, targets: list[str], task_type: str, total_steps: int) -> PeftConfig:
        """The PEFT config of the adapter: ``(run config, resolved target modules, PEFT task type, total optimizer
        steps) -> PeftConfig``."""
        raise NotImplementedError(f"method '{self.name}' builds no adapter")

    def options_from_adapter(self, peft_config: PeftConfig) -> dict[str, Any]:
        """The run options an adapter's PEFT config decides (e.g. whether B-LoRA's core is Bayesian), for training a
        model built outside bayeslora's own loop."""
        return {}

    def members(self, config: RunConfig) -> list[str]:
        """The names of the adapters a run trains one after the other (an ensemble's members), or [] for a run
        with one adapter."""
        return []

    # --- options ---
    def groups(self, config: RunConfig) -> tuple[str, ...]:
        """The option groups a run of this method with ``config`` uses."""
        return self.option_groups

    def resolve(self, config: RunConfig) -> RunConfig:
        """``config`` with this method's defaults filled into the options left unset (``None``), so that a
        run's ``config.yaml`` records the values actually used."""
        updates = {key: value for key, value in self.option_defaults.items() if getattr(config, key) is None}
        return dataclasses.replace(config, **updates) if updates else config

    def used_options(self, config: RunConfig) -> set[str]:
        """The method-specific options (of :data:`~bayeslora.config.OPTION_GROUPS`) a run with ``config`` uses;
        of a posterior's KL schedule options, those of ``config.kl_schedule``."""
        groups = self.groups(config)
        if "posterior" in groups:
            groups = (*groups, f"{config.kl_schedule} schedule")
        return {option for group in groups for option in OPTION_GROUPS[group][0]}

    def check_inputs(self, config: RunConfig, task: Task) -> RunConfig:
        """``config`` checked against what the method needs before anything is trained (errors name the fix);
        options the method resolves against ``task`` are filled in, so that ``config.yaml`` records them."""
        return config

    # --- prediction ---
    def is_stochastic(self, config: RunConfig) -> bool:
        """Whether a run of this method with ``config`` predicts by averaging posterior samples."""
        return False

    def accepts_samples(self, config: RunConfig) -> bool:
        """Whether ``--samples`` means something to a run with ``config`` (else it is named in a warning)."""
        return self.is_stochastic(config)

    def samples(self, requested: int | None, config: RunConfig) -> int:
        """Posterior samples to average: the request, or the method's default; deterministic methods use 1
        (their prediction is the same every time)."""
        if not self.is_stochastic(config):
            return 1
        return self.default_samples if requested is None else requested

    def predictive(self, config: RunConfig, n_samples: int, run_dir: Path | None = None) -> dict[str, Any]:
        """How the predictive distribution is drawn: keyword arguments of :func:`bayeslora.evaluation.predictive.
        predict` (dropout masks, ensemble members, a custom ``sampler``); {} for posterior samples of the adapter
        (or the one deterministic prediction). ``run_dir`` holds what training left (a Laplace posterior)."""
        return {}

    def predictive_record(self, config: RunConfig) -> dict[str, Any]:
        """How the method predicts beyond its number of samples, as an evaluation records it."""
        return {key: getattr(config, key) for key in self.predictive_options}

    # --- training ---
    def training_extras(self, model: nn.Module, config: RunConfig, n_train: int) -> TrainingExtras:
        """The loss terms, callbacks and special learning rates training adds for this method (``n_train``:
        training examples, for per-example KL weights)."""
        return TrainingExtras()

    def after_training(
        self, model: nn.Module, config: RunConfig, scorer: Scorer, task: Task, train_examples: list, run: Path
    ) -> dict[str, Any]:
        """Work after the adapter is trained and saved (a post-hoc posterior fitted into ``run``); returns what the
        training summary records."""
        return {}


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (names are unique); returns it."""
    if method.name in METHODS:
        raise ValueError(f"method '{method.name}' is already registered")
    METHODS[method.name] = method
    return method


class UnknownMethodError(ValueError):
    """``--method`` names no registered method."""


def get_method(name: str) -> Method:
    """The registered method ``name``, or an error listing the known ones."""
    if name not in METHODS:
        known = ", ".join(f"{m.name} ({m.description})" for m in METHODS.values() if m.trains)
        raise UnknownMethodError(f"Unknown method '{name}'. Known methods: {known}.")
    return METHODS[name]


def method_of_model(model: nn.Module) -> Method | None:
    """The registered method whose adapter ``model`` (a ``PeftModel``) holds as its active adapter, by the adapter's
    PEFT type; None for adapters no method claims alone (plain LoRA, which several methods train)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping) or not configs:
        return None
    active = getattr(model, "active_adapter", None)
    config = configs.get(active) if isinstance(active, str) else next(iter(configs.values()))
    peft_type = getattr(config, "peft_type", None)
    peft_type = str(getattr(peft_type, "value", peft_type))
    return next((m for m in METHODS.values() if m.peft_type is not None and m.peft_type == peft_type), None)


def shared_options(config: RunConfig, targets: list[str], task_type: str) -> dict[str, Any]:
    """The options every low-rank PEFT config takes from a run: rank, α, dropout, targets, task type."""
    return {
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout or 0.0,
        "target_modules": targets,
        "task_type": task_type,
    }
