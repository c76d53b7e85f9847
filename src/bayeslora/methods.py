"""The method registry: what ``--method`` may name, and how each builds its PEFT adapter.

Every method is a PEFT tuner. Plain LoRA is PEFT's own LoRA unchanged, so comparisons with it are fair.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peft import PeftConfig

    from .config import RunConfig


@dataclass(frozen=True)
class Method:
    """A fine-tuning method.

    Attributes:
        name: the ``--method`` value.
        description: one line for ``bayeslora methods`` and reports.
        build_config: ``(run config, resolved target modules, PEFT task type, total optimizer steps) ->
            PeftConfig``.
        stochastic: whether predictions average posterior samples (``--samples`` > 1 is meaningful); a
            function of the run configuration for methods where an option decides it.
        default_samples: samples averaged at evaluation when ``--samples`` is not given.
        option_defaults: values of :class:`~bayeslora.config.RunConfig` options that this method sets when
            the user leaves them unset (``None``), e.g. its prior; see :meth:`resolve`.
        prediction: how its predictive distribution is drawn: ``sample`` (posterior samples of the adapter,
            or the one deterministic prediction), ``dropout`` (MC dropout: the adapter's dropout kept on) or
            ``ensemble`` (one adapter per member, ``--ensemble-size`` of them, trained with seeds seed + k) or
            ``laplace`` (a K-FAC Laplace posterior fitted over the LoRA weights after training).
        option_groups: the groups of method-specific options (:data:`OPTION_GROUPS`) it uses; a function of
            the run configuration for methods where an option decides it.
    """

    name: str
    description: str
    build_config: Callable[[RunConfig, list[str], str, int], PeftConfig]
    stochastic: bool | Callable[[RunConfig], bool] = False
    default_samples: int = 1
    option_defaults: Mapping[str, Any] = field(default_factory=dict)
    prediction: str = "sample"
    option_groups: tuple[str, ...] | Callable[[RunConfig], tuple[str, ...]] = ()

    def resolve(self, config: RunConfig) -> RunConfig:
        """``config`` with this method's defaults filled into the options left unset (``None``), so that a
        run's ``config.yaml`` records the values actually used."""
        updates = {key: value for key, value in self.option_defaults.items() if getattr(config, key) is None}
        return dataclasses.replace(config, **updates) if updates else config

    def is_stochastic(self, config: RunConfig) -> bool:
        """Whether a run of this method with ``config`` predicts by averaging posterior samples."""
        return self.stochastic(config) if callable(self.stochastic) else self.stochastic

    def used_options(self, config: RunConfig) -> set[str]:
        """The method-specific options (of :data:`OPTION_GROUPS`) a run of this method with ``config`` uses;
        of a posterior's KL schedule options, those of ``config.kl_schedule``."""
        groups = self.option_groups(config) if callable(self.option_groups) else self.option_groups
        if "posterior" in groups:
            groups = (*groups, f"{config.kl_schedule} schedule")
        return {option for group in groups for option in OPTION_GROUPS[group][0]}

    def samples(self, requested: int | None, config: RunConfig) -> int:
        """Posterior samples to average: the request, or the method's default; deterministic methods use 1
        (their prediction is the same every time); an ensemble, its number of members."""
        if self.prediction == "ensemble":
            return config.ensemble_size
        if not self.is_stochastic(config):
            return 1
        return self.default_samples if requested is None else requested


#: The method-specific options of :class:`~bayeslora.config.RunConfig`, by group: ``(options, who uses them)``.
#: Every other option (rank, learning rate, ...) applies to every method.
OPTION_GROUPS: dict[str, tuple[tuple[str, ...], str]] = {
    "core": (
        ("core", "core_init", "prior_mean", "sigma_param"),
        "Me-LoRA's Gaussian core (melora, blora --bayesian-core)",
    ),
    "posterior": (
        ("prior_std", "sigma_init", "sigma_lr", "kl_schedule"),
        "the variational adapters (melora, blob, blora --bayesian-core)",
    ),
    "elbo schedule": (("kl_weight", "kl_warmup"), "the variational adapters with --kl-schedule elbo"),
    "blob schedule": (("kl_lr", "blob_gamma"), "the variational adapters with --kl-schedule blob"),
    "gates": (
        (
            "max_bits",
            "rank_gate_init",
            "bit_gate_init",
            "gate_temperature",
            "gate_lambda",
            "gate_cost",
            "gate_lr",
            "gate_warmup",
            "gate_fix",
            "quantize_base",
            "base_max_bits",
            "base_min_bits",
            "bayesian_core",
        ),
        "--method blora",
    ),
    "ensemble": (("ensemble_size", "ensemble_combine"), "--method ensemble"),
    "laplace": (("laplace_subset", "laplace_prior", "laplace_predictive"), "--method laplace"),
}


def option_users(option: str) -> str | None:
    """Who uses the method-specific ``option`` (from :data:`OPTION_GROUPS`); None for an option of every method."""
    return next((who for options, who in OPTION_GROUPS.values() if option in options), None)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (names are unique)."""
    if method.name in METHODS:
        raise ValueError(f"method '{method.name}' is already registered")
    METHODS[method.name] = method
    return method


class UnknownMethodError(ValueError):
    """``--method`` names no registered method."""


def get_method(name: str) -> Method:
    """The registered method ``name``, or an error listing the known ones."""
    if name not in METHODS:
        known = ", ".join(f"{m.name} ({m.description})" for m in METHODS.values())
        raise UnknownMethodError(f"Unknown method '{name}'. Known methods: {known}.")
    return METHODS[name]


def _shared_options(config: RunConfig, targets: list[str], task_type: str) -> dict[str, Any]:
    """The options every low-rank PEFT config takes from a run: rank, α, dropout, targets, task type."""
    return {
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout or 0.0,
        "target_modules": targets,
        "task_type": task_type,
    }


def _core_options(config: RunConfig) -> dict[str, Any]:
    """The options of a Gaussian r×r core (Me-LoRA, and B-LoRA's Bayesian core)."""
    return {
        "core": config.core,
        "core_init": config.core_init,
        "sigma_init": config.sigma_init,
        "sigma_param": config.sigma_param,
        "prior_mean": config.prior_mean,
        "prior_std": config.prior_std,
    }


def _lora_config(config: RunConfig, targets: list[str], task_type: str, total_steps: int) -> PeftConfig:
    from peft import LoraConfig

    return LoraConfig(**_shared_options(config, targets, task_type))


def _melora_config(config: RunConfig, targets: list[str], task_type: str, total_steps: int) -> PeftConfig:
    from .tuners import MeLoraConfig

    return MeLoraConfig(
        **_shared_options(config, targets, task_type),
        **_core_options(config),
    )


def _blob_config(config: RunConfig, targets: list[str], task_type: str, total_steps: int) -> PeftConfig:
    from .tuners import BlobConfig

    return BlobConfig(
        **_shared_options(config, targets, task_type),
        init_eps=config.sigma_init,
        prior_std=config.prior_std,
    )


def _blora_config(config: RunConfig, targets: list[str], task_type: str, total_steps: int) -> PeftConfig:
    from .tuners import BLoraConfig

    return BLoraConfig(
        **_shared_options(config, targets, task_type),
        bayesian_core=config.bayesian_core,
        max_bits=config.max_bits,
        rank_gate_init=config.rank_gate_init,
        bit_gate_init=config.bit_gate_init,
        gate_temperature=config.gate_temperature,
        quantize_base=config.quantize_base,
        base_max_bits=config.base_max_bits,
        base_min_bits=config.base_min_bits,
        **_core_options(config),
    )


def _adalora_config(config: RunConfig, targets: list[str], task_type: str, total_steps: int) -> PeftConfig:
    from peft import AdaLoraConfig

    # the AdaLoRA paper's schedule: rank 1.5x the target to start, budget pruned between 10% and 80% of the
    # steps; the final average rank equals --rank, the budget of a LoRA of that rank
    return AdaLoraConfig(
        init_r=math.ceil(1.5 * config.rank),
        target_r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout or 0.0,
        target_modules=targets,
        task_type=task_type,
        total_step=total_steps,
        tinit=int(0.1 * total_steps),
        tfinal=int(0.2 * total_steps),
        deltaT=max(1, total_steps // 100),
    )


#: Me-LoRA's default learning rate for Σ_S (the variance parameters), independent of ``--lr``.
MELORA_SIGMA_LR = 0.05

#: Me-LoRA's core options when the user leaves them unset (also B-LoRA's Bayesian core).
MELORA_DEFAULTS = {"sigma_init": 0.1, "prior_std": 1.0, "sigma_lr": MELORA_SIGMA_LR}

register_method(Method("lora", "plain LoRA, PEFT's own implementation (the MLE baseline)", _lora_config))
register_method(
    Method(
        "map",
        "LoRA with weight decay (1e-5 by default): the MAP baseline of the Bayesian-LoRA literature",
        _lora_config,
        option_defaults={"weight_decay": 1e-5},
    )
)
register_method(
    Method(
        "mcdropout",
        "MC dropout: LoRA trained with dropout (0.1 by default) kept on at evaluation, N samples averaged",
        _lora_config,
        stochastic=True,
        default_samples=10,
        option_defaults={"dropout": 0.1},
        prediction="dropout",
    )
)
register_method(
    Method(
        "ensemble",
        "deep ensemble of --ensemble-size LoRA adapters (seeds seed, seed+1, ...) in one model",
        _lora_config,
        prediction="ensemble",
        option_groups=("ensemble",),
    )
)
register_method(
    Method(
        "laplace",
        "Laplace-LoRA: LoRA, then a post-hoc K-FAC Laplace posterior over its weights (linearised predictive)",
        _lora_config,
        stochastic=True,
        default_samples=10,
        prediction="laplace",
        option_groups=("laplace",),
    )
)
register_method(
    Method(
        "melora",
        "Me-LoRA: deterministic A, B and a Gaussian r×r core S between them (ΔW = s·B·S·A)",
        _melora_config,
        stochastic=True,
        default_samples=10,
        # σ starts at a tenth of the prior's std and gets its own learning rate, so that the core's
        # variance can reach its ELBO optimum within a fine-tuning run (benchmarks/calibration.py: with the
        # main learning rate σ barely moves and Me-LoRA calibrates no better than LoRA).
        option_defaults=MELORA_DEFAULTS,
        option_groups=("core", "posterior"),
    )
)
register_method(
    Method(
        "blob",
        "BLoB: a Gaussian on every entry of A, flipout (Wang et al., NeurIPS 2024)",
        _blob_config,
        stochastic=True,
        default_samples=10,
        option_defaults={"sigma_init": 0.05, "prior_std": 0.2},  # the BLoB paper's ε and prior std
        option_groups=("posterior",),
    )
)
register_method(
    Method(
        "blora",
        "B-LoRA: rank and bit-width of every matrix learned by hard-concrete gates (Bayesian Bits quantizer)",
        _blora_config,
        # with --bayesian-core the adapter carries Me-LoRA's Gaussian core: its predictions average samples
        stochastic=lambda config: config.bayesian_core,
        default_samples=10,
        option_defaults=MELORA_DEFAULTS,
        option_groups=lambda config: ("gates", "core", "posterior") if config.bayesian_core else ("gates",),
    )
)
register_method(
    Method(
        "adalora",
        "AdaLoRA (PEFT's own): SVD-form LoRA whose ranks are pruned to a budget (average rank --rank)",
        _adalora_config,
    )
)
