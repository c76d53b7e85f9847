"""The pipeline: what ``bayeslora train``, ``eval``, ``predict``, ``generate``, ``calibrate``, ``laplace``, ``export``
and ``demo`` do, end to end, from a run's options to its directory. Each step asks the run's method
(:mod:`bayeslora.methods`) for whatever is method-specific."""

from .calibrate import calibrate
from .common import build_scorer
from .evaluate import evaluate
from .export import export
from .generate import generate_answers
from .laplace import laplace
from .predict import predict_inputs
from .train import train

__all__ = ["build_scorer", "calibrate", "evaluate", "export", "generate_answers", "laplace", "predict_inputs", "train"]
