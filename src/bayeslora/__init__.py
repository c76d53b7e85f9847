"""bayeslora: Bayesian fine-tuning of language models with low-rank adapters.

The Python API mirrors the command line::

    import bayeslora as bl

    model, tokenizer = bl.load_model("smollm2-135m")
    task = bl.load_task("arc-easy")
    run = bl.train(task="arc-easy", method="lora", max_steps=100, batch_size=4, lr=3e-4,
                   output_dir="runs/arc-lora")
    metrics = bl.evaluate(run, limit=300)
"""

from . import tuners  # noqa: F401  (registers Me-LoRA and BLoB with PEFT)
from .api import attach_adapter, build_scorer, evaluate, train
from .config import RunConfig, make_config
from .inference import Prediction, predict, predict_batch
from .methods import METHODS, get_method
from .metrics import classification_metrics
from .models import MODEL_ALIASES, load_model, load_tokenizer
from .sampling import posterior_mean
from .scoring import ClassificationScorer, ClozeScorer, LetterScorer, make_scorer
from .tasks import TASKS, load_task
from .tuners import BlobConfig, MeLoraConfig

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "MODEL_ALIASES",
    "TASKS",
    "BlobConfig",
    "ClassificationScorer",
    "ClozeScorer",
    "LetterScorer",
    "MeLoraConfig",
    "Prediction",
    "RunConfig",
    "attach_adapter",
    "build_scorer",
    "classification_metrics",
    "evaluate",
    "get_method",
    "load_model",
    "load_task",
    "load_tokenizer",
    "make_config",
    "make_scorer",
    "posterior_mean",
    "predict",
    "predict_batch",
    "train",
]
