"""The method registry: what ``--method`` may name, and how each builds its PEFT adapter.

Every method is a PEFT tuner. Plain LoRA is PEFT's own LoRA unchanged, so comparisons with it are fair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peft import PeftConfig

    from .config import RunConfig


@dataclass(frozen=True)
class Method:
    """A fine-tuning method.

    Attributes:
        name: the ``--method`` value.
        description: one line for ``bayeslora methods`` and reports.
        build_config: ``(run config, resolved target modules, PEFT task type) -> PeftConfig``.
        stochastic: whether predictions average posterior samples (``--samples`` > 1 is meaningful).
        default_samples: samples averaged at evaluation when ``--samples`` is not given.
    """

    name: str
    description: str
    build_config: Callable[[RunConfig, list[str], str], PeftConfig]
    stochastic: bool = False
    default_samples: int = 1

    def samples(self, requested: int | None) -> int:
        """Posterior samples to average: the request, or the method's default; deterministic methods use 1
        (their prediction is the same every time)."""
        if not self.stochastic:
            return 1
        return self.default_samples if requested is None else requested


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


def _lora_config(config: RunConfig, targets: list[str], task_type: str) -> PeftConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        task_type=task_type,
    )


def _melora_config(config: RunConfig, targets: list[str], task_type: str) -> PeftConfig:
    from .tuners import MeLoraConfig

    return MeLoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        task_type=task_type,
        core=config.core,
        core_init=config.core_init,
        sigma_init=0.1 if config.sigma_init is None else config.sigma_init,
        sigma_param=config.sigma_param,
        prior_mean=config.prior_mean,
        prior_std=1.0 if config.prior_std is None else config.prior_std,
    )


def _blob_config(config: RunConfig, targets: list[str], task_type: str) -> PeftConfig:
    from .tuners import BlobConfig

    return BlobConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        task_type=task_type,
        init_eps=0.05 if config.sigma_init is None else config.sigma_init,
        prior_std=0.2 if config.prior_std is None else config.prior_std,
    )


register_method(Method("lora", "plain LoRA, PEFT's own implementation (the MLE baseline)", _lora_config))
register_method(
    Method(
        "melora",
        "Me-LoRA: deterministic A, B and a Gaussian r×r core S between them (ΔW = s·B·S·A)",
        _melora_config,
        stochastic=True,
        default_samples=10,
    )
)
register_method(
    Method(
        "blob",
        "BLoB: a Gaussian on every entry of A, flipout (Wang et al., NeurIPS 2024)",
        _blob_config,
        stochastic=True,
        default_samples=10,
    )
)
