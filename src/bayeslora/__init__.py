"""bayeslora: Bayesian fine-tuning of language models with low-rank adapters.

The Python API mirrors the command line::

    import bayeslora as bl

    model, tokenizer = bl.load_model("smollm2-135m")
    task = bl.load_task("arc-easy")
    run = bl.train(task="arc-easy", method="lora", max_steps=100, batch_size=4, lr=3e-4,
                   output_dir="runs/arc-lora")
    metrics = bl.evaluate(run, limit=300)
"""

from . import tuners  # noqa: F401  (registers Me-LoRA, BLoB and B-LoRA with PEFT)
from .adapters import AdapterFileError, attach_adapter, load_adapter
from .api import build_scorer, evaluate, train
from .bops import bops_report
from .config import RunConfig, make_config
from .exporters import export_lora, export_packed, load_packed
from .fingerprint import AdapterMismatchError
from .inference import Prediction, predict, predict_batch
from .methods import METHODS, get_method
from .metrics import classification_metrics
from .models import MODEL_ALIASES, load_model, load_tokenizer
from .posthoc import calibrate, export, laplace
from .sampling import posterior_mean
from .scoring import ClassificationScorer, ClozeScorer, LetterScorer, make_scorer
from .tasks import TASKS, load_task
from .tuners import BlobConfig, BLoraConfig, MeLoraConfig

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "MODEL_ALIASES",
    "TASKS",
    "AdapterFileError",
    "AdapterMismatchError",
    "BLoraConfig",
    "BlobConfig",
    "ClassificationScorer",
    "ClozeScorer",
    "LetterScorer",
    "MeLoraConfig",
    "Prediction",
    "RunConfig",
    "attach_adapter",
    "bops_report",
    "build_scorer",
    "calibrate",
    "classification_metrics",
    "evaluate",
    "export",
    "export_lora",
    "export_packed",
    "get_method",
    "laplace",
    "load_adapter",
    "load_model",
    "load_packed",
    "load_task",
    "load_tokenizer",
    "make_config",
    "make_scorer",
    "posterior_mean",
    "predict",
    "predict_batch",
    "train",
]
