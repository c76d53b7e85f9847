"""``mcdropout``: LoRA trained with dropout on the adapter input, kept on at evaluation; N dropout masks averaged."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .base import register_method
from .lora import Lora

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..tasks import Task


class McDropout(Lora):
    """Predictions average ``--samples`` passes with the adapters' dropout on (one tiled pass, each copy its own
    masks); ``--samples 0`` predicts with dropout off."""

    name = "mcdropout"
    description = "MC dropout: LoRA trained with dropout (0.1 by default) kept on at evaluation, N samples averaged"
    option_defaults: ClassVar[Mapping[str, Any]] = {"dropout": 0.1}
    default_samples = 10

    def is_stochastic(self, config: RunConfig) -> bool:
        return True

    def check_inputs(self, config: RunConfig, task: Task) -> RunConfig:
        """MC dropout samples the adapters' dropout, so it needs some."""
        if not config.dropout:
            raise ValueError(
                f"--method {config.method} averages predictions over the adapters' dropout masks, and --dropout "
                f"{config.dropout} leaves nothing to sample: set --dropout above 0 (0.1 by default), or train "
                f"--method lora for the deterministic adapter."
            )
        return config

    def predictive(self, config: RunConfig, n_samples: int, run_dir: Path | None = None) -> dict[str, Any]:
        return {"dropout": n_samples > 0}  # --samples 0: the network without dropout


METHOD = register_method(McDropout())
