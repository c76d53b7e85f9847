"""The Me-LoRA PEFT model: wraps each target linear layer in a :class:`MeLoraLayer`."""

from __future__ import annotations

from ..base import BayesianLowRankModel
from .layer import MeLoraLayer


class MeLoraModel(BayesianLowRankModel):
    """Creates a Me-LoRA model from a transformers model (use ``peft.get_peft_model`` with a
    :class:`~bayeslora.MeLoraConfig`)."""

    prefix: str = "melora_"
    layer_cls = MeLoraLayer
    tuner_layer_cls = MeLoraLayer
