"""Extra loss terms: what a method adds to the task loss (a KL, a gate penalty, a regulariser), how several
combine, and everything a method adds to a training run (:class:`TrainingExtras`). No Trainer is imported here: a
term is a function of the model and the trainer's state."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import TrainerCallback


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


@dataclass
class TrainingExtras:
    """What a method adds to a training run: loss terms (:data:`ExtraLoss`), Trainer callbacks and learning rates of
    particular parameters (``[(parameters, lr), ...]``, without weight decay)."""

    losses: list[ExtraLoss] = field(default_factory=list)
    callbacks: list[TrainerCallback] = field(default_factory=list)
    special_lrs: list[tuple[Sequence[nn.Parameter], float]] = field(default_factory=list)

    def __add__(self, other: TrainingExtras) -> TrainingExtras:
        return TrainingExtras(
            [*self.losses, *other.losses],
            [*self.callbacks, *other.callbacks],
            [*self.special_lrs, *other.special_lrs],
        )

    def __bool__(self) -> bool:
        return bool(self.losses or self.callbacks or self.special_lrs)
