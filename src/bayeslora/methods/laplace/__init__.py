"""``laplace``: Laplace-LoRA (Yang et al., ICLR 2024). LoRA is trained as usual, then a Kronecker-factored Laplace
posterior is fitted over its weights (:mod:`.kfac`), its prior precision chosen on held-out training examples or by
the marginal likelihood, and predictions use the linearised (or a sampled) predictive."""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ...runs.layout import LAPLACE_FILE
from ...tasks import DATA_SEED, HELDOUT_EXAMPLES, seeded_heldout
from ..base import register_method
from ..lora import Lora
from .kfac import KronLaplace, resolve_prior

if TYPE_CHECKING:
    from ...config import RunConfig
    from ...evaluation.scoring import Scorer
    from ...tasks import Task

#: The options of a post-hoc Laplace fit (``bayeslora laplace``); the others are those of the LoRA run.
LAPLACE_OPTIONS = ("laplace_subset", "laplace_prior", "laplace_predictive", "samples", "eval_batch_size")
#: The methods whose adapter a post-hoc Laplace posterior can be fitted to (a single plain LoRA adapter).
LAPLACE_SOURCES = ("lora", "map")


class Laplace(Lora):
    """LoRA, then a K-FAC Laplace posterior saved in the run as ``laplace.safetensors``."""

    name = "laplace"
    description = "Laplace-LoRA: LoRA, then a post-hoc K-FAC Laplace posterior over its weights (linearised predictive)"
    option_groups = ("laplace",)
    predictive_options = ("laplace_predictive",)
    default_samples = 10

    def is_stochastic(self, config: RunConfig) -> bool:
        return True

    def check_inputs(self, config: RunConfig, task: Task) -> RunConfig:
        """The prior rule resolved against ``task``'s training split (``auto`` becomes ``heldout`` or ``marglik``,
        see :func:`resolve_prior`), so that ``config.yaml`` records the rule used and a held-out prior with no
        held-out examples is refused now."""
        if task.kind == "instruction":
            raise ValueError(
                "--method laplace fits its posterior to class scores; instruction data has none: train a Bayesian "
                "adapter (melora, blob) for a posterior over free text"
            )
        prior = resolve_prior(config.laplace_prior, len(task.split("train")), config.train_size)
        return dataclasses.replace(config, laplace_prior=prior)

    def after_training(
        self, model: nn.Module, config: RunConfig, scorer: Scorer, task: Task, train_examples: list, run: Path
    ) -> dict[str, Any]:
        return fit_laplace(model, config, scorer, task, train_examples, run)

    def predictive(self, config: RunConfig, n_samples: int, run_dir: Path | None = None) -> dict[str, Any]:
        """The posterior read from ``run_dir``; ``--samples 0`` predicts with the trained LoRA (the mode)."""
        if n_samples == 0:
            return {}
        if run_dir is None or not (Path(run_dir) / LAPLACE_FILE).is_file():
            raise FileNotFoundError(f"{run_dir} holds no Laplace posterior ({LAPLACE_FILE}); train the run again")
        laplace = KronLaplace.load(Path(run_dir) / LAPLACE_FILE)
        sampler = functools.partial(laplace.predict_batch, predictive=config.laplace_predictive, n_samples=n_samples)
        return {"sampler": sampler}


def fit_laplace(model: nn.Module, config: RunConfig, scorer: Scorer, task: Task, train_examples: list, run: Path):
    """Fit the K-FAC Laplace posterior of a trained LoRA on its training examples, choose the prior precision
    (marginal likelihood, or held-out training examples), save it as ``laplace.safetensors``; returns what
    the training summary records."""
    started = time.perf_counter()
    laplace = KronLaplace.fit(
        model, scorer, train_examples, subset=config.laplace_subset, batch_size=config.batch_size, seed=config.seed
    )
    split = task.split("train")
    prior = resolve_prior(config.laplace_prior, len(split), config.train_size)
    if prior == "heldout":
        heldout = seeded_heldout(split, config.train_size, HELDOUT_EXAMPLES, DATA_SEED)
        laplace.select_prior_precision_on(model, scorer, heldout, batch_size=config.batch_size)
    else:
        laplace.optimize_prior_precision()
    laplace.save(run / LAPLACE_FILE)
    return {
        "laplace_prior": prior,
        "laplace_prior_precision": laplace.prior_precision,
        "laplace_params": laplace.num_params,
        "laplace_fit_s": round(time.perf_counter() - started, 2),
    }


METHOD = register_method(Laplace())
