"""Training on the transformers ``Trainer``: the task loss plus the method's loss terms, callbacks, distributed runs."""

from .losses import ExtraLoss, LossTerms, combine_losses
from .trainer import BayesLoraTrainer, ExampleDataset, NonFiniteLossError, training_arguments

__all__ = [
    "BayesLoraTrainer",
    "ExampleDataset",
    "ExtraLoss",
    "LossTerms",
    "NonFiniteLossError",
    "combine_losses",
    "training_arguments",
]
