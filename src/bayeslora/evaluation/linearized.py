"""The predictive of a Gaussian over class scores, and the linearised predictive of a variational adapter.

A variational adapter's weights are w = μ + σ ⊙ ε with ε ~ N(0, I) (Me-LoRA's core S, B-LoRA's Bayesian core, BLoB's
A). Linearising the class scores of an example in the noise at ε = 0,

    f(ε) ≈ f(0) + J ε,   J = ∂f/∂ε |₀ = (∂f/∂w) diag(σ)   (C × P per example),

makes them Gaussian, f ~ N(f(μ), J Jᵀ): the "GLM" predictive of linearised Laplace (Immer et al., 2021), here with
the variational posterior. J comes from one forward pass at the posterior mean (the noise enters as zero leaves,
:func:`~bayeslora.tuners.sampling.noise_at_zero`) and one backward pass per class, which reaches only the layers
between the first Bayesian layer and the scores: with the posterior in the LM head alone, one pass of the model and
C backward passes through the head replace N tiled posterior samples. Where the scores are linear in the noise (a
classification head carrying the posterior) the Gaussian is exact; through the softmax of a language model's
tokens it is an approximation, good while σ is small against the curvature of the scores.

The class probabilities of f ~ N(m, V) are then
* ``glm``: the mean softmax of Monte Carlo draws of f (C numbers each: cheap);
* ``probit``: the probit approximation, softmax(m'_c / √(1 + π/8 · V'_cc)) (MacKay, 1992; laplace-torch's
  ``link_approx="probit"``), which ignores the covariances between classes. m' and V' are the mean and the
  covariance of the scores centred over the choices, P m and P V P with P = I − 1 1ᵀ/C: the softmax ignores a
  shift common to every score, and the cloze scores of one question, which share its context and its weight
  sample, move mostly together. Applied to the raw scores, as laplace-torch does, the approximation is not
  invariant to that shift: on a test model here (tests/test_linearized.py, σ = 0.1 to 0.4) its probabilities were
  off those of 1,000 posterior samples by up to 0.5, against 0.015-0.09 centred and 0.01-0.02 for the Monte
  Carlo link.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..tuners.sampling import noise_at_zero
from ..tuners.trunk import samples_weights
from .predictive import model_device, move_batch
from .scoring import Batch, Scorer

#: Monte Carlo draws of the class scores in the ``glm`` link (cheap: C numbers each).
GAUSSIAN_DRAWS = 1000
#: How the probabilities of Gaussian class scores are computed.
LINKS = ("glm", "probit")


def gaussian_softmax(
    mean: Tensor,
    covariance: Tensor,
    link: str = "glm",
    *,
    draws: int = GAUSSIAN_DRAWS,
    generator: torch.Generator | None = None,
    keep: int = 0,
) -> Tensor | tuple[Tensor, Tensor]:
    """E[softmax(f)] for f ~ N(mean, covariance) per example; missing choices (``-inf`` in ``mean``) stay at 0.

    Args:
        mean: (B, C) class scores, ``-inf`` for missing choices.
        covariance: (B, C, C), zero in the rows and columns of missing choices.
        link: ``glm`` (the mean softmax of ``draws`` draws of f) or ``probit`` (softmax(m' / √(1 + π/8·diag V'))
            on the scores centred over the valid choices, see the module docstring).
        generator: the random numbers of the draws (also for ``probit``'s kept draws).
        keep: also return the softmax of ``keep`` draws of f, (keep, B, C): single samples, for the entropies
            that split the uncertainty.

    Returns:
        (B, C) probabilities, and with ``keep`` the kept draws' probabilities.
    """
    if link not in LINKS:
        raise ValueError(f"the link of a Gaussian over class scores must be one of {', '.join(LINKS)}, got '{link}'")
    valid = torch.isfinite(mean)
    centre = torch.where(valid, mean, torch.zeros_like(mean))
    sampled = None
    if link == "glm" or keep:
        jitter = 1e-9 * torch.eye(mean.shape[-1], dtype=covariance.dtype, device=covariance.device)
        chol = torch.linalg.cholesky(covariance + jitter)  # (B, C, C)
        count = draws if link == "glm" else keep
        noise = torch.randn(count, *mean.shape, dtype=covariance.dtype, generator=generator).to(mean.device)
        sampled = (centre + torch.einsum("bij,sbj->sbi", chol, noise)).masked_fill(~valid, float("-inf")).softmax(-1)
    if link == "glm":
        probs = sampled.mean(0)  # (B, C)
    else:
        variance = centred_covariance(covariance, valid).diagonal(dim1=-2, dim2=-1)  # (B, C)
        count = valid.sum(-1, keepdim=True).clamp_min(1)
        centred = mean - centre.sum(-1, keepdim=True) / count  # (B, C), -inf stays
        probs = (centred / (1 + math.pi / 8 * variance).sqrt()).softmax(-1)
    return (probs, sampled[:keep]) if keep else probs


def centred_covariance(covariance: Tensor, valid: Tensor) -> Tensor:
    """The covariance of the class scores centred over each example's valid choices, P V P with P = I − 1 1ᵀ/C_b on
    the valid ones, (B, C, C): the softmax does not see a shift common to all scores, so its variance must not damp
    the probabilities (cloze scores of one question share the context and the noise, and mostly move together)."""
    weights = valid.to(covariance.dtype)  # (B, C)
    count = weights.sum(-1, keepdim=True).clamp_min(1)  # (B, 1)
    projector = torch.diag_embed(weights) - weights[:, :, None] * weights[:, None, :] / count[:, :, None]  # (B, C, C)
    return projector @ covariance @ projector.transpose(1, 2)


@contextmanager
def _parameters_frozen(model: nn.Module) -> Iterator[None]:
    """Within the block no parameter of ``model`` requires grad (autograd then records only the paths from the
    noise leaves to the scores)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)


def check_linearizable(model: nn.Module) -> None:
    """Raise ValueError unless some layer of ``model`` carries a variational posterior (Me-LoRA's core, B-LoRA's
    Bayesian core, BLoB's A) that the linearised predictive can differentiate in its noise."""
    if not any(samples_weights(module) for module in model.modules()):
        raise ValueError(
            "the linearised predictive needs a variational adapter (melora, blob, or blora with --bayesian-core); "
            "this model has no layer that samples its weights: use --posterior-predictive samples"
        )


def linearized_scores(model: nn.Module, scorer: Scorer, batch: Batch) -> tuple[Tensor, Tensor]:
    """``(f (B, C), J Jᵀ (B, C, C))``: the class scores at the posterior mean and their covariance under the
    posterior linearised in its noise (module docstring), float64, zero for missing choices.

    Each example's noise is its own (one weight sample per example), so the gradient of Σ_b f_bc with respect to a
    noise leaf (E, ...) holds every example's row of J for class c: one backward pass per class."""
    check_linearizable(model)
    mask = batch["choice_mask"]  # (B, C)
    num_examples, num_classes = mask.shape
    with torch.enable_grad(), _parameters_frozen(model), noise_at_zero() as leaves:
        scores = scorer.class_logits(model, batch)  # (B, C)
        noise = list(leaves.values())
        if not noise:
            raise RuntimeError("no Bayesian layer drew noise in the forward pass: the linearised predictive is empty")
        rows = []
        for c in range(num_classes):
            target = scores[:, c].masked_fill(~mask[:, c], 0.0).sum()
            grads = torch.autograd.grad(target, noise, retain_graph=c < num_classes - 1, allow_unused=True)
            flat = [_per_example(g, leaf, num_examples) for g, leaf in zip(grads, noise, strict=True)]
            rows.append(torch.cat(flat, dim=1))  # (B, P)
    jacobian = torch.stack(rows, 1)  # (B, C, P)
    covariance = jacobian @ jacobian.transpose(1, 2)  # (B, C, C)
    covariance = covariance * (mask[:, :, None] & mask[:, None, :])
    return scores.detach().double(), covariance


def _per_example(grad: Tensor | None, leaf: Tensor, num_examples: int) -> Tensor:
    """A noise leaf's gradient as (B, P) float64: rows of examples the leaf does not reach (an example index
    beyond its first dimension, or no gradient at all) are zero."""
    flat = (torch.zeros_like(leaf) if grad is None else grad).double().flatten(1)  # (E, P)
    if flat.shape[0] < num_examples:
        flat = torch.cat([flat, flat.new_zeros(num_examples - flat.shape[0], flat.shape[1])])
    return flat[:num_examples]


def linearized_predict_batch(
    model: nn.Module, scorer: Scorer, batch: Batch, link: str = "probit", n_samples: int = 10
) -> tuple[Tensor, Tensor]:
    """``(probs (B, C), per-sample probs (S, B, C))`` of the linearised predictive: the ``link``'s probabilities of
    f ~ N(f(μ), J Jᵀ) and the softmax of ``n_samples`` draws of f (for the entropies of single samples)."""
    batch = move_batch(batch, model_device(model))
    scores, covariance = linearized_scores(model, scorer, batch)
    probs, draws = gaussian_softmax(scores, covariance, link, keep=max(n_samples, 1))
    return probs.float(), draws.float()
