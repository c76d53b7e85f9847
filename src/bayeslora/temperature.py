"""Temperature scaling (Guo et al., ICML 2017): one scalar T fitted on held-out predictions.

Predictions are rescaled as ``p_T = softmax(log p / T)``: for a deterministic model that is
``softmax(z / T)`` of its class scores z (log p and z differ by a per-example constant), and for a Bayesian
or ensemble prediction it recalibrates the averaged predictive distribution. T > 1 softens over-confident
predictions, T < 1 sharpens under-confident ones; the most probable class never changes, so accuracy does
not either. T minimises the held-out NLL (L-BFGS on log T, float64), so it never raises the NLL of the data
it was fitted on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: T is kept within [1/100, 100].
MAX_LOG_T = 4.605170185988092  # log 100


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


def fit_temperature(probs: Tensor, labels: Tensor, max_iter: int = 200) -> float:
    """The T > 0 minimising ``NLL(softmax(log p / T), labels)`` over held-out ``probs`` (N, C)."""
    if probs.shape[0] == 0:
        raise ValueError("temperature scaling needs at least one held-out prediction")
    log_p, labels = _log_probs(probs), labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(log_p / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    # uninformative predictions drive T to infinity (the uniform distribution): stop at 100
    temperature = float(log_t.detach().clamp(-MAX_LOG_T, MAX_LOG_T).exp())
    if not torch.isfinite(torch.tensor(temperature)):
        raise FloatingPointError("temperature scaling diverged (are the held-out labels all predicted with p = 0?)")
    return temperature
