"""``map``: LoRA with weight decay, the MAP baseline of the Bayesian-LoRA literature (a Gaussian prior on the
LoRA weights, through AdamW's decoupled decay)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from .base import register_method
from .lora import Lora


class Map(Lora):
    """LoRA trained with ``--weight-decay`` (1e-5 unless set); training warns when the decay rounds away."""

    name = "map"
    description = "LoRA with weight decay (1e-5 by default): the MAP baseline of the Bayesian-LoRA literature"
    option_defaults: ClassVar[Mapping[str, Any]] = {"weight_decay": 1e-5}


METHOD = register_method(Map())
