"""The B-LoRA PEFT model: wraps each target linear layer in a :class:`BLoraLayer`."""

from __future__ import annotations

from ..base import BayesianLowRankModel
from .layer import PHASES, BLoraLayer


class BLoraModel(BayesianLowRankModel):
    """Creates a B-LoRA model from a transformers model (use ``peft.get_peft_model`` with a
    :class:`~bayeslora.BLoraConfig`)."""

    prefix: str = "blora_"
    layer_cls = BLoraLayer
    tuner_layer_cls = BLoraLayer

    def set_gate_phase(self, phase: str, adapter: str | None = None) -> None:
        """Put every B-LoRA layer's ``adapter`` (every adapter when None) in ``phase`` (open, sample or fixed; see
        :mod:`.layer`)."""
        if phase not in PHASES:
            raise ValueError(f"unknown gate phase '{phase}': {', '.join(PHASES)}")
        for layer in self.bayesian_layers():
            if adapter is None or layer._has(adapter):
                layer.set_phase(phase, adapter)
