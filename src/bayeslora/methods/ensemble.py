"""``ensemble``: a deep ensemble of LoRA adapters in one model, trained one after the other with seeds seed + k."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import register_method
from .lora import Lora

if TYPE_CHECKING:
    from ..config import RunConfig


class Ensemble(Lora):
    """``--ensemble-size`` K LoRA members (adapters ``member0`` ...), each trained with its own seed; predictions
    combine the members' probabilities (or their class scores, ``--ensemble-combine logits``)."""

    name = "ensemble"
    description = "deep ensemble of --ensemble-size LoRA adapters (seeds seed, seed+1, ...) in one model"
    option_groups = ("ensemble",)
    predictive_options = ("ensemble_combine",)

    def members(self, config: RunConfig) -> list[str]:
        return [f"member{k}" for k in range(config.ensemble_size)]

    def accepts_samples(self, config: RunConfig) -> bool:
        return True  # its "samples" are its members; --samples is not named in a warning

    def samples(self, requested: int | None, config: RunConfig) -> int:
        return config.ensemble_size

    def predictive(self, config: RunConfig, n_samples: int, run_dir: Path | None = None) -> dict[str, Any]:
        return {"members": self.members(config), "combine": config.ensemble_combine}


METHOD = register_method(Ensemble())
