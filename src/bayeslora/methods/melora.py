"""``melora``: Me-LoRA, memory-efficient Bayesian LoRA. Deterministic A (r×n) and B (m×r) and a Gaussian r×r core S
between them, ΔW = s·B·S·A (the tuner: :mod:`bayeslora.tuners.melora`)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from .base import register_method, shared_options
from .variational import VariationalMethod, posterior_options

if TYPE_CHECKING:
    from peft import PeftConfig

    from ..config import RunConfig

#: Me-LoRA's default learning rate for Σ_S (the variance parameters), independent of ``--lr``.
MELORA_SIGMA_LR = 0.05

#: Me-LoRA's core options when the user leaves them unset (also B-LoRA's Bayesian core). σ starts at a tenth of the
#: prior's std and gets its own learning rate, so that the core's variance can reach its ELBO optimum within a
#: fine-tuning run (benchmarks/calibration.py: with the main learning rate σ barely moves and Me-LoRA calibrates no
#: better than LoRA).
MELORA_DEFAULTS = {"sigma_init": 0.1, "prior_std": 1.0, "sigma_lr": MELORA_SIGMA_LR}

#: The learning rate of a unit-factor core's mean when none is given: all of ΔW's scale lives in its r² entries,
#: which at LoRA's learning rates move far slower than LoRA's m·r entries of B (chosen on held-out ARC-Easy training
#: questions among 0.01, 0.05 and 0.2: held-out NLL 0.991, 0.933, 0.974 after 2 epochs).
UNIT_CORE_LR = 0.05


def core_options(config: RunConfig) -> dict[str, Any]:
    """The options of a Gaussian r×r core (Me-LoRA, and B-LoRA's Bayesian core)."""
    return {
        "factor_norm": config.factor_norm,
        "core": config.core,
        "core_init": config.core_init,
        "sigma_init": config.sigma_init,
        "sigma_param": config.sigma_param,
        "prior_mean": config.prior_mean,
        "prior_std": config.prior_std,
        "core_prior": config.core_prior,
    }


def resolve_core(config: RunConfig) -> RunConfig:
    """A Gaussian core's defaults that depend on its parametrisation: with unit factors a zero-centred prior and the
    core's mean trained at :data:`UNIT_CORE_LR`; with free factors an identity-centred prior."""
    updates: dict[str, Any] = {}
    if config.prior_mean is None:
        updates["prior_mean"] = "zero" if config.factor_norm == "unit" else "identity"
    if config.factor_norm == "unit" and config.core_lr is None:
        updates["core_lr"] = UNIT_CORE_LR
    return dataclasses.replace(config, **updates) if updates else config


class MeLora(VariationalMethod):
    """S = M_S + Σ_S ⊙ ε drawn once per example; N posterior samples run as one tiled pass."""

    name = "melora"
    description = "Me-LoRA: deterministic A, B and a Gaussian r×r core S between them (ΔW = s·B·S·A)"
    option_groups = ("core", "posterior")
    peft_type = "MELORA"
    option_defaults = MELORA_DEFAULTS

    def resolve(self, config: RunConfig) -> RunConfig:
        return resolve_core(super().resolve(config))

    def peft_config(self, config: RunConfig, targets: list[str], task_type: str, total_steps: int) -> PeftConfig:
        from ..tuners import MeLoraConfig

        return MeLoraConfig(
            **shared_options(config, targets, task_type), **core_options(config), **posterior_options(config)
        )


METHOD = register_method(MeLora())
