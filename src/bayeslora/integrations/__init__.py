"""bayeslora in other libraries' loops: Bayesian adapters in any Hugging Face ``Trainer`` (TRL's included)."""

from .trainer import BayesianTrainer, BayesianTrainerMixin, bayesian_trainer

__all__ = ["BayesianTrainer", "BayesianTrainerMixin", "bayesian_trainer"]
