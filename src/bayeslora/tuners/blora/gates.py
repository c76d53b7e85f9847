"""Hard-concrete gates (Louizos, Welling & Kingma, ICLR 2018) and their nested expected cost.

A gate z ∈ [0, 1] with a learned logit log α. In training it is a reparameterised sample

    u ~ U(0, 1),   s = σ((log u − log(1 − u) + log α) / β),   z = clamp(s·(ζ − γ) + γ, 0, 1),

with temperature β = 2/3 and stretch (γ, ζ) = (−0.1, 1.1), so that z is exactly 0 or exactly 1 with
non-zero probability and the sample is differentiable in log α. In closed form

    P(z ≠ 0) = σ(log α − β·log(−γ / ζ)).

At evaluation a gate is deterministic: on when P(z = 0) < 0.34 (the Bayesian Bits rule).

Gates come in *nested* chains z_1, z_2, ...: component k counts only if every gate before it is on
(``m_k = Π_{j≤k} z_j``), so a rank is a prefix length and a bit-width a number of doublings. The expected
cost of a chain with per-gate costs c_k is ``Σ_k c_k · Π_{j≤k} P(z_j ≠ 0)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Hard-concrete stretch interval (γ, ζ) and default temperature β.
GAMMA, ZETA, BETA = -0.1, 1.1, 2.0 / 3.0
#: A gate is on at evaluation when P(z = 0) is below this.
OFF_THRESHOLD = 0.34


def prob_nonzero(log_alpha: Tensor, beta: float = BETA) -> Tensor:
    """P(z ≠ 0) = σ(log α − β·log(−γ/ζ)), elementwise."""
    return torch.sigmoid(log_alpha - beta * math.log(-GAMMA / ZETA))


def sample_gates(log_alpha: Tensor, beta: float = BETA) -> Tensor:
    """One reparameterised hard-concrete sample per entry of ``log_alpha`` (differentiable in it)."""
    u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def deterministic_gates(log_alpha: Tensor, beta: float = BETA) -> Tensor:
    """The evaluation-time gates: 1 where P(z = 0) < 0.34, else 0 (no gradient)."""
    return (1 - prob_nonzero(log_alpha.detach(), beta) < OFF_THRESHOLD).to(log_alpha.dtype)


def gate_logit_for(probability: float, beta: float = BETA) -> float:
    """The log α whose P(z ≠ 0) is ``probability`` (inverse of :func:`prob_nonzero`)."""
    if not 0 < probability < 1:
        raise ValueError(f"a gate probability must be in (0, 1), got {probability}")
    return math.log(probability / (1 - probability)) + beta * math.log(-GAMMA / ZETA)


def nested(gates: Tensor) -> Tensor:
    """Cumulative products along the last dimension: component k is kept when gates 1..k all are."""
    return torch.cumprod(gates, dim=-1)


def nested_expected_cost(log_alpha: Tensor, costs: Tensor | float = 1.0, beta: float = BETA) -> Tensor:
    """Σ_k c_k · Π_{j≤k} P(z_j ≠ 0) over a chain of gates (last dimension of ``log_alpha``)."""
    return (nested(prob_nonzero(log_alpha, beta)) * costs).sum(-1)


def prefix_length(gates: Tensor) -> int:
    """How many leading gates of a (deterministic) chain are on."""
    return int(nested(gates).sum().item())
