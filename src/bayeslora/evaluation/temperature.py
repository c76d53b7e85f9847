"""Temperature scaling (Guo et al., ICML 2017): one scalar T fitted on held-out predictions.

Predictions are rescaled as ``p_T = softmax(log p / T)``: for a deterministic model that is
``softmax(z / T)`` of its class scores z (log p and z differ by a per-example constant), and for a Bayesian
or ensemble prediction it recalibrates the averaged predictive distribution. T > 1 softens over-confident
predictions, T < 1 sharpens under-confident ones; the most probable class never changes, so accuracy does
not either. T minimises the held-out NLL, so it never raises the NLL of the data it was fitted on.

The NLL is convex in the inverse temperature β = 1/T: NLL(β) = mean_i [logsumexp_c(β log p_ic) − β log p_iy],
a log-sum-exp of functions linear in β plus a linear term. Its derivative,
dNLL/dβ = mean_i [E_{softmax(β log p_i)}[log p_i] − log p_iy], increases with β, so the minimiser is found
by bisection on the sign of the derivative (over log β, float64) to machine precision. No step can
overflow, choices an example does not have (p = 0) keep weight 0, and uninformative or misleading
predictions, whose NLL keeps falling towards the uniform distribution as T grows, stop at T = 100.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: T is kept within [1/MAX_T, MAX_T].
MAX_T = 100.0
MAX_LOG_T = math.log(MAX_T)


def _log_probs(probs: Tensor) -> Tensor:
    """log p in float64, −inf where p = 0 (a choice the example does not have)."""
    probs = probs.double()
    return torch.where(probs > 0, probs.clamp_min(1e-300).log(), torch.full_like(probs, float("-inf")))


def scaled(probs: Tensor, temperature: float) -> Tensor:
    """``softmax(log p / T)`` row by row, ``(N, C) -> (N, C)``, in float64 (a large T brings probabilities
    close together; float32 would turn some into ties and move the argmax)."""
    if temperature <= 0:
        raise ValueError(f"a temperature must be positive, got {temperature}")
    return (_log_probs(probs) / temperature).softmax(-1)


def fit_temperature(probs: Tensor, labels: Tensor, iterations: int = 100) -> float:
    """The T in [1/100, 100] minimising ``NLL(softmax(log p / T), labels)`` over held-out ``probs`` (N, C)."""
    if probs.shape[0] == 0:
        raise ValueError("temperature scaling needs at least one held-out prediction")
    log_p = _log_probs(probs)  # (N, C), −inf for missing choices
    valid = torch.isfinite(log_p)
    label_log_p = log_p.gather(1, labels.long()[:, None]).squeeze(1)  # (N,)
    if not torch.isfinite(label_log_p).all():
        raise FloatingPointError(
            "temperature scaling is undefined: a held-out label was predicted with probability 0 (its NLL is "
            "infinite at every temperature)"
        )

    def slope(log_beta: float) -> float:
        """dNLL/dβ at β = exp(log_beta)."""
        weights = torch.where(valid, log_p * math.exp(log_beta), -torch.inf).softmax(-1)  # (N, C)
        expected = torch.where(valid, weights * log_p, torch.zeros_like(log_p)).sum(-1)  # (N,)
        return float((expected - label_log_p).mean())

    low, high = -MAX_LOG_T, MAX_LOG_T  # log β; β = 1/T
    at_low, at_high = slope(low), slope(high)
    if max(abs(at_low), abs(at_high)) < 1e-12:  # the NLL does not depend on T (uniform predictions, one choice)
        return 1.0
    if at_low >= 0:  # the NLL still falls as β -> 0: the most uniform prediction allowed
        return MAX_T
    if at_high <= 0:  # still falls as β grows: the sharpest allowed
        return 1 / MAX_T
    for _ in range(iterations):
        middle = (low + high) / 2
        if middle in (low, high):  # the interval cannot shrink further in float64
            break
        if slope(middle) > 0:
            high = middle
        else:
            low = middle
    return math.exp(-(low + high) / 2)
