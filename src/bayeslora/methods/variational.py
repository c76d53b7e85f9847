"""What the variational adapters share (Me-LoRA, BLoB, B-LoRA's Bayesian core): their training objective, as a loss
term and a callback for the transformers Trainer, and the :class:`VariationalMethod` base of their methods.

* ``elbo`` (default): per example, ``mean NLL + β·KL(q || p) / N_train`` — the negative evidence lower
  bound divided by the number of training examples N_train — with β annealed linearly from 0 to
  ``kl_weight`` over the first ``kl_warmup`` fraction of the steps. Everything is stepped by AdamW.
* ``blob``: the BLoB paper's recipe. AdamW steps the mean NLL only; after every optimizer step a separate
  SGD step (``kl_lr``, with the same warm-up/decay shape as the main schedule) is taken on π_i·KL, where
  π_i = 2^i / (2^(M+1) − 1) cycles i = 1..M with M = ⌊100·N_train^(π/γ) / batch⌋: within each cycle the
  KL weight grows geometrically and sums to 1.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from ..evaluation.linearized import linearized_predict_batch
from ..training.distributed import world
from ..training.losses import LossTerms
from ..tuners.base import BayesianLowRankLayer, BayesianLowRankModel
from .base import Method, TrainingExtras


def bayesian_tuner(model: nn.Module) -> BayesianLowRankModel | None:
    """The Bayesian tuner inside a PEFT model (``PeftModel.base_model``), or None for other adapters."""
    for module in model.modules():
        if isinstance(module, BayesianLowRankModel):
            return module
    return None


def model_kl(model: nn.Module) -> Tensor:
    """KL(q || p) of all Bayesian adapter layers of ``model`` (float64 scalar)."""
    tuner = bayesian_tuner(model)
    if tuner is None:
        raise ValueError("the model has no Bayesian adapter (melora, blob)")
    return tuner.kl()


def posterior_options(config) -> dict[str, Any]:
    """The options every variational tuner's config takes from a run: which layers carry the posterior."""
    return {"bayesian_layers": config.bayesian_layers}


def variance_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable variance parameters (ρ of Me-LoRA's core, G of BLoB) of every Bayesian layer."""
    found: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, BayesianLowRankLayer):
            for name in module.variance_parameter_names:
                found += [p for p in getattr(module, name).parameters() if p.requires_grad]
    return found


@torch.no_grad()
def posterior_std_mean(model: nn.Module) -> float:
    """The mean posterior standard deviation over every random entry of the model's Bayesian adapters
    (active adapters only); a quick view of how far the variational posterior has moved."""
    total, count = 0.0, 0
    for module in model.modules():
        if isinstance(module, BayesianLowRankLayer):
            for adapter in module.active_adapters:
                if module._has(adapter):
                    std = module.posterior_std(adapter)
                    total += float(std.double().sum())
                    count += std.numel()
    return total / max(count, 1)


class ElboObjective:
    """``β·KL/N_train`` added to the mean NLL, with β = kl_weight·min(1, step / warm-up steps)."""

    def __init__(self, n_train: int, kl_weight: float = 1.0, kl_warmup: float = 0.1) -> None:
        if n_train <= 0:
            raise ValueError(f"n_train must be positive, got {n_train}")
        self.n_train = n_train
        self.kl_weight = kl_weight
        self.kl_warmup = kl_warmup

    def beta(self, step: int, max_steps: int) -> float:
        """The KL weight at optimizer step ``step`` (0-based) of ``max_steps``."""
        warmup = self.kl_warmup * max_steps
        return self.kl_weight if warmup <= 0 else self.kl_weight * min(1.0, (step + 1) / warmup)

    def __call__(self, model: nn.Module, trainer) -> LossTerms:
        kl = model_kl(model)
        beta = self.beta(trainer.state.global_step, trainer.state.max_steps)
        term = (beta * kl / self.n_train).to(torch.float32)
        logs = {"kl": float(kl.detach()), "beta": beta, "sigma_mean": posterior_std_mean(model)}
        return LossTerms(terms={"kl_term": term}, logs=logs)


def blob_cycle_length(n_train: int, batch_size: int, gamma: float = 8.0) -> int:
    """M = ⌊100·N_train^(π/γ) / batch⌋ (at least 1), the length of BLoB's KL re-weighting cycle."""
    return max(1, int(100 * n_train ** (math.pi / gamma) / batch_size))


def blob_pi(step: int, cycle: int) -> float:
    """π_i = 2^i / (2^(M+1) − 1) for the i-th step of a cycle of M (i = 1..M), computed in log space."""
    i = step % cycle or cycle
    log_denominator = (cycle + 1) * math.log(2) + math.log1p(-(2.0 ** -(cycle + 1)))
    return math.exp(i * math.log(2) - log_denominator)


class BlobKLStep(TrainerCallback):
    """After each optimizer step, an SGD step of learning rate ``kl_lr·schedule`` on π_i·KL (BLoB's recipe)."""

    def __init__(self, n_train: int, batch_size: int, kl_lr: float = 0.01, gamma: float = 8.0) -> None:
        self.kl_lr = kl_lr
        self.cycle = blob_cycle_length(n_train, batch_size, gamma)
        self.last: dict[str, float] = {}

    def on_step_end(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        params = [p for p in model.parameters() if p.requires_grad]
        kl = model_kl(model)
        pi = blob_pi(state.global_step, self.cycle)
        scale = lr_scheduler.get_last_lr()[0] / args.learning_rate if lr_scheduler is not None else 1.0
        grads = torch.autograd.grad(pi * kl, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.add_(g.to(p.dtype), alpha=-self.kl_lr * scale)
        self.last = {"kl": float(kl.detach()), "pi": pi, "sigma_mean": posterior_std_mean(model)}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs.update(self.last)


def bayesian_objective(config, n_train: int):
    """``(extra_loss, callbacks)`` for the Trainer, per ``config.kl_schedule``. BLoB's cycle length counts the
    global batch: per device, times accumulation, times the processes (as the reference divides by them)."""
    if config.kl_schedule == "blob":
        global_batch = config.batch_size * config.grad_accum * world()[1]
        return None, [BlobKLStep(n_train, global_batch, config.kl_lr, config.blob_gamma)]
    return ElboObjective(n_train, config.kl_weight, config.kl_warmup), []


def core_mean_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable means M_S of the Gaussian cores (Me-LoRA, B-LoRA's Bayesian core) of every layer."""
    found: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, BayesianLowRankLayer) and getattr(module, "core_mean_name", None):
            found += [p for p in getattr(module, module.core_mean_name).parameters() if p.requires_grad]
    return found


def variational_extras(model: nn.Module, config, n_train: int) -> TrainingExtras:
    """The KL term (or BLoB's KL step) of a variational adapter, and the learning rates of its variance parameters
    (``--sigma-lr``) and of a core's mean (``--core-lr``), for a model whose adapter has variance parameters."""
    variances = variance_parameters(model)
    if not variances:
        return TrainingExtras()
    kl_loss, callbacks = bayesian_objective(config, n_train)
    special = [(variances, config.sigma_lr)] if config.sigma_lr is not None else []
    means = core_mean_parameters(model)
    if getattr(config, "core_lr", None) is not None and means:
        special.append((means, config.core_lr))
    return TrainingExtras(
        losses=[kl_loss] if kl_loss is not None else [], callbacks=list(callbacks), special_lrs=special
    )


class VariationalMethod(Method):
    """A method whose adapter carries a variational posterior: predictions average posterior samples, training
    adds the KL (:func:`variational_extras`)."""

    option_groups = ("posterior",)
    predictive_options = ("posterior_predictive", "sample_layers")
    default_samples = 10

    def is_stochastic(self, config) -> bool:
        return True

    def predictive(self, config, n_samples: int, run_dir: Path | None = None) -> dict[str, Any]:
        return variational_predictive(config, n_samples)

    def training_extras(self, model: nn.Module, config, n_train: int) -> TrainingExtras:
        return variational_extras(model, config, n_train)


def variational_predictive(config, n_samples: int) -> dict[str, Any]:
    """The keyword arguments of :func:`~bayeslora.evaluation.predictive.predict` for ``--posterior-predictive``
    and ``--sample-layers``: none for posterior samples of every layer (or the mean, ``n_samples`` = 0); the
    linearised predictive as a ``sampler`` (:mod:`bayeslora.evaluation.linearized`; ``n_samples`` of its Gaussian
    draws kept as single samples); the layers whose posterior is sampled (``sample_layers``, see
    :func:`~bayeslora.tuners.trunk.sampled_layers`)."""
    if n_samples == 0:
        return {}
    predictive: dict[str, Any] = {}
    if config.sample_layers != "all":
        predictive["sample_layers"] = config.sample_layers
    if config.posterior_predictive != "samples":
        predictive["sampler"] = functools.partial(
            linearized_predict_batch, link=config.posterior_predictive, n_samples=n_samples
        )
    return predictive
