"""The predictive distribution: class probabilities averaged over posterior samples.

For a Bayesian adapter, ``p̄(y|x) = (1/N) Σ_s softmax(f(x; θ_s))`` with θ_s drawn from the posterior.
The N samples of a batch run as ONE forward pass over the batch tiled N times (see
:meth:`bayeslora.scoring.Scorer.repeat`): each copy of an example gets its own weight sample, which
costs Me-LoRA only N·B small r×r matrices. Deterministic adapters use N = 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..tasks import Example
from ..tuners.sampling import posterior_mean, sample_copies, sampling
from ..tuners.trunk import sampled_layers, shared_trunk
from .scoring import Batch, Scorer


@dataclass
class Prediction:
    """Predictions for a list of examples, in their original order.

    Attributes:
        probs: ``(N_examples, C)`` sample-averaged class probabilities (0 for missing choices).
        labels: ``(N_examples,)`` true classes.
        sample_probs: ``(n_samples, N_examples, C)`` per-sample probabilities, when kept.
    """

    probs: Tensor
    labels: Tensor
    sample_probs: Tensor | None = None


def move_batch(batch: Batch, device: torch.device) -> Batch:
    """All tensors of ``batch`` on ``device``."""
    return {key: value.to(device) for key, value in batch.items()}


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter."""
    return next(model.parameters()).device


@torch.no_grad()
def predict_batch(
    model: nn.Module,
    scorer: Scorer,
    batch: Batch,
    n_samples: int = 1,
    *,
    dropout: bool = False,
    members: Sequence[str] = (),
    combine: str = "probs",
    share_trunk: bool = True,
) -> tuple[Tensor, Tensor]:
    """Predictive probabilities of one collated batch.

    Args:
        model: the (adapted) model, in eval mode.
        scorer: the scorer that collated ``batch``.
        batch: a collated batch (moved to the model's device here).
        n_samples: posterior samples averaged, run as one pass over the batch tiled ``n_samples`` times
            (each copy of an example draws its own weights); 0 predicts with the posterior mean.
        dropout: MC dropout: the adapters' dropout stays on in the sampled pass (each copy its own masks).
        members: an ensemble: one pass per member adapter of the PEFT model (``n_samples`` is ignored).
        combine: how an ensemble's members are combined: ``probs`` (mean of their softmax probabilities)
            or ``logits`` (softmax of their mean class scores, as the BLoB code does).
        share_trunk: when only the top blocks carry the posterior, the blocks below run once for all samples
            (:func:`~bayeslora.tuners.trunk.shared_trunk`; the same result as the fully tiled pass).

    Returns:
        ``(probs (B, C), sample_probs (S, B, C))`` with S = max(n_samples, 1), or the number of members.
    """
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0 (0 = posterior mean), got {n_samples}")
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {', '.join(COMBINE)}, got '{combine}'")
    batch = move_batch(batch, model_device(model))
    num_examples = batch["labels"].shape[0]
    if members:
        logits = torch.stack([_member_logits(model, scorer, batch, member) for member in members])  # (K, B, C)
        sample_probs = logits.softmax(-1)
        probs = sample_probs.mean(0) if combine == "probs" else logits.mean(0).softmax(-1)
        return probs, sample_probs
    if n_samples == 0:
        with posterior_mean():
            probs = scorer.class_logits(model, batch).float().softmax(-1)  # (B, C)
        return probs, probs[None]
    tiled = scorer.repeat(batch, n_samples) if n_samples > 1 else batch
    with posterior_copies(model, n_samples, num_examples, dropout=dropout, share_trunk=share_trunk):
        logits = scorer.class_logits(model, tiled)  # (n_samples·B, C)
    sample_probs = logits.float().softmax(-1).view(n_samples, num_examples, -1)  # (n_samples, B, C)
    return sample_probs.mean(0), sample_probs


#: ``(model, scorer, batch) -> (probs (B, C), per-sample probs (S, B, C))``: a custom predictive.
BatchPredictor = Callable[[nn.Module, Scorer, Batch], tuple[Tensor, Tensor]]

#: How ensemble members are combined.
COMBINE = ("probs", "logits")


@contextmanager
def using_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Within the block the PEFT model's active adapter is ``name`` (an ensemble member); the previous one after."""
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)


def _member_logits(model: nn.Module, scorer: Scorer, batch: Batch, member: str) -> Tensor:
    """Class scores (B, C) of the batch under ensemble member ``member`` (a named adapter of the model)."""
    with using_adapter(model, member):
        return scorer.class_logits(model, batch).float()


@contextmanager
def posterior_copies(
    model: nn.Module, n_samples: int, examples_per_copy: int, *, dropout: bool = False, share_trunk: bool = True
) -> Iterator[None]:
    """Within the block, a forward pass over a batch tiled ``n_samples`` times (copies of ``examples_per_copy``
    examples) draws its own posterior sample per example of each copy, or its own dropout masks with ``dropout``;
    with ``share_trunk`` the deterministic blocks below the posterior run once for all copies
    (:func:`~bayeslora.tuners.trunk.shared_trunk`)."""
    with (
        sampling(),
        sample_copies(examples_per_copy),
        adapter_dropout(model, active=dropout),
        shared_trunk(model, n_samples, enabled=share_trunk and not dropout),
    ):
        yield


@contextmanager
def adapter_dropout(model: nn.Module, active: bool = True) -> Iterator[None]:
    """Within the block, the dropout modules of the model's adapter layers (PEFT LoRA's ``lora_dropout``,
    bayeslora's ``adapter_dropout``) are in training mode, so that every forward pass draws new masks
    (MC dropout); the rest of the model stays in evaluation mode. A no-op when ``active`` is False."""
    modules = [
        dropout
        for module in model.modules()
        for name in ("lora_dropout", "adapter_dropout")
        if isinstance(getattr(module, name, None), nn.ModuleDict)
        for dropout in getattr(module, name).values()
        if isinstance(dropout, nn.Dropout)
    ]
    if not active:
        yield
        return
    if not modules:
        raise ValueError("MC dropout needs adapters with dropout (--dropout > 0); the model has none")
    states = [module.training for module in modules]
    for module in modules:
        module.train()
    try:
        yield
    finally:
        for module, state in zip(modules, states, strict=True):
            module.train(state)


def _length_order(examples: Sequence[Example]) -> list[int]:
    """Example indices sorted by text length, so that batches hold similar lengths (less padding)."""

    def size(example: Example) -> int:
        if hasattr(example, "completion"):
            return len(example.prompt) + len(example.completion)
        if hasattr(example, "contexts"):
            return len(set(example.contexts)) * len(example.contexts[0]) + sum(map(len, example.continuations))
        return len(example.text) + len(example.text_pair or "")

    return sorted(range(len(examples)), key=lambda i: size(examples[i]))


def iterate_batches(examples: Sequence[Example], batch_size: int) -> Iterator[list[int]]:
    """Index batches in length order (eval only: the order is restored afterwards)."""
    order = _length_order(examples)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def predict(
    model: nn.Module,
    scorer: Scorer,
    examples: Sequence[Example],
    *,
    n_samples: int = 1,
    batch_size: int = 16,
    keep_samples: bool = False,
    progress: bool = True,
    dropout: bool = False,
    members: Sequence[str] = (),
    combine: str = "probs",
    sampler: BatchPredictor | None = None,
    sample_layers: str = "all",
) -> Prediction:
    """Predictive class probabilities for ``examples`` (sample-averaged over ``n_samples``; MC dropout with
    ``dropout``; an ensemble's ``members`` combined per ``combine``: see :func:`predict_batch`; or any
    other ``sampler(model, scorer, batch) -> (probs, per-sample probs)``, such as a Laplace posterior's).
    ``sample_layers="last:K"`` samples the posterior of the top K blocks and the head only, the posterior mean
    below (:func:`~bayeslora.tuners.trunk.sampled_layers`).

    Batches are formed by length (less padding) and the results put back in the original order.
    ``keep_samples`` also returns the per-sample (or per-member) probabilities ``(S, N, C)``.
    """
    if not examples:
        raise ValueError("no examples to predict")
    was_training = model.training
    model.eval()
    probs = torch.zeros(len(examples), scorer.num_classes)
    kept: list[tuple[Tensor, Tensor]] = []
    labels = torch.zeros(len(examples), dtype=torch.long)
    bar = tqdm(total=len(examples), desc="evaluating", unit="ex", disable=not progress, leave=False)
    try:
        with sampled_layers(model, sample_layers):
            for indices in iterate_batches(examples, batch_size):
                batch = scorer.collate([examples[i] for i in indices])
                if sampler is not None:  # a custom predictive may need gradients (Laplace's): results detached
                    mean, per_sample = (result.detach() for result in sampler(model, scorer, batch))
                else:
                    mean, per_sample = predict_batch(
                        model, scorer, batch, n_samples, dropout=dropout, members=members, combine=combine
                    )
                index = torch.tensor(indices)
                probs[index] = mean.cpu()
                labels[index] = batch["labels"]
                if keep_samples:
                    kept.append((index, per_sample.cpu()))
                bar.update(len(indices))
    finally:
        bar.close()
        model.train(was_training)
    samples = None
    if kept:  # (S, N, C) in the original order
        samples = torch.zeros(kept[0][1].shape[0], len(examples), scorer.num_classes)
        for index, per_sample in kept:
            samples[:, index] = per_sample
    return Prediction(probs=probs, labels=labels, sample_probs=samples)
