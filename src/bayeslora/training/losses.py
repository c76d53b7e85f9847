"""Extra loss terms: what a method adds to the task loss (a KL, a gate penalty, a regulariser), and how several
combine. No Trainer is imported here: a term is a function of the model and the trainer's state."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn


@dataclass
class LossTerms:
    """What an extra loss contributes: ``terms`` are added to the loss (and logged), ``logs`` only logged."""

    terms: dict[str, Tensor] = field(default_factory=dict)
    logs: dict[str, float] = field(default_factory=dict)


#: ``extra_loss(model, trainer) -> LossTerms``, evaluated at every training step.
ExtraLoss = Callable[[nn.Module, Any], LossTerms]


def combine_losses(losses: Sequence[ExtraLoss]) -> ExtraLoss | None:
    """One :data:`ExtraLoss` adding the terms and logs of several (None if there are none)."""
    losses = list(losses)
    if not losses:
        return None
    if len(losses) == 1:
        return losses[0]

    def combined(model: nn.Module, trainer) -> LossTerms:
        total = LossTerms()
        for loss in losses:
            part = loss(model, trainer)
            total.terms.update(part.terms)
            total.logs.update(part.logs)
        return total

    return combined
