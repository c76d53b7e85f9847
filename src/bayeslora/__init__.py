"""bayeslora: Bayesian fine-tuning of language models with low-rank adapters.

The Python API mirrors the command line::

    import bayeslora as bl

    model, tokenizer = bl.load_model("smollm2-135m")
    task = bl.load_task("arc-easy")
    run = bl.train(task="arc-easy", method="lora", max_steps=100, batch_size=4, lr=3e-4,
                   output_dir="runs/arc-lora")
    metrics = bl.evaluate(run, limit=300)
"""

from . import _quiet_imports, tuners  # noqa: F401  (first: quiet third-party import noise; then register the tuners)
from .config import RunConfig, make_config
from .evaluation.generation import generate
from .evaluation.metrics import classification_metrics
from .evaluation.predictive import Prediction, predict, predict_batch
from .evaluation.scoring import ClassificationScorer, ClozeScorer, LetterScorer, make_scorer
from .integrations import BayesianTrainer, bayesian_trainer
from .methods import METHODS, get_method
from .methods.variational import model_kl
from .models import MODEL_ALIASES, load_model, load_tokenizer
from .pipeline import build_scorer, calibrate, evaluate, export, generate_answers, laplace, predict_inputs, train
from .reporting.bops import bops_report
from .reporting.posterior import posterior_widths
from .runs.adapters import AdapterFileError, attach_adapter, load_adapter
from .runs.export import export_lora, export_packed, load_packed
from .runs.fingerprint import AdapterMismatchError
from .tasks import TASKS, load_task
from .tuners import BlobConfig, BLoraConfig, MeLoraConfig
from .tuners.sampling import frozen_samples, posterior_mean, sampling

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "MODEL_ALIASES",
    "TASKS",
    "AdapterFileError",
    "AdapterMismatchError",
    "BLoraConfig",
    "BayesianTrainer",
    "BlobConfig",
    "ClassificationScorer",
    "ClozeScorer",
    "LetterScorer",
    "MeLoraConfig",
    "Prediction",
    "RunConfig",
    "attach_adapter",
    "bayesian_trainer",
    "bops_report",
    "build_scorer",
    "calibrate",
    "classification_metrics",
    "evaluate",
    "export",
    "export_lora",
    "export_packed",
    "frozen_samples",
    "generate",
    "generate_answers",
    "get_method",
    "laplace",
    "load_adapter",
    "load_model",
    "load_packed",
    "load_task",
    "load_tokenizer",
    "make_config",
    "make_scorer",
    "model_kl",
    "posterior_mean",
    "posterior_widths",
    "predict",
    "predict_batch",
    "predict_inputs",
    "sampling",
    "train",
]
