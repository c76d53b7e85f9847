"""``blob``: BLoB, Bayesian LoRA by backpropagation (Wang et al., NeurIPS 2024): a Gaussian on every entry of A,
sampled with flipout (the tuner: :mod:`bayeslora.tuners.blob`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from .base import register_method, shared_options
from .variational import VariationalMethod, posterior_options

if TYPE_CHECKING:
    from peft import PeftConfig

    from ..config import RunConfig


class Blob(VariationalMethod):
    """The paper's ε = 0.05 (``--sigma-init``, the tuner's ``init_eps``) and prior N(0, 0.2²) unless set."""

    name = "blob"
    description = "BLoB: a Gaussian on every entry of A, flipout (Wang et al., NeurIPS 2024)"
    peft_type = "BLOB"
    option_defaults: ClassVar[Mapping[str, Any]] = {
        "sigma_init": 0.05,
        "prior_std": 0.2,
    }  # the BLoB paper's ε and prior std

    def peft_config(self, config: RunConfig, targets: list[str], task_type: str, total_steps: int) -> PeftConfig:
        from ..tuners import BlobConfig

        return BlobConfig(
            **shared_options(config, targets, task_type),
            init_eps=config.sigma_init,
            prior_std=config.prior_std,
            **posterior_options(config),
        )


METHOD = register_method(Blob())
