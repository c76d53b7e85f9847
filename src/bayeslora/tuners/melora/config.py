"""Configuration of Me-LoRA, memory-efficient Bayesian LoRA."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..base import LowRankBayesConfig

CORES = ("full", "diag")
CORE_INITS = ("identity", "orthogonal")
SIGMA_PARAMS = ("softplus", "exp")
PRIOR_MEANS = ("identity", "zero")


@dataclass
class MeLoraCoreOptions(LowRankBayesConfig):
    """The options of a Gaussian r×r core S = M_S + Σ_S ⊙ ε, ε_ij ~ N(0, 1), drawn once per example
    (shared by Me-LoRA and by B-LoRA's Bayesian core). Choices and why:

    * ``core_init`` — M_S starts full-rank (identity by default). With B = 0 at the start, a zero M_S would
      make every gradient zero (A's gradient goes through B·M_S, B's through M_S·A).
    * ``sigma_init`` — every entry of Σ_S starts at this value, in units of the core's initial scale (the
      rows of the identity or of an orthogonal core have norm 1). BLoB's σ ≈ 0.002 on entries of A of size
      ~1/√n is a different scale; Σ_S is measured against M_S ≈ I.
    * ``prior_mean`` — the prior on S is centred on the identity (or zero). The factorisation has a scale
      freedom, B·S·A = (B/u)(uS)A: scaling the core's mean and standard deviation by u and B by 1/u leaves
      ΔW's distribution unchanged, and neither prior centre makes the KL invariant to it (see docs/methods.md).
    """

    core: str = field(
        default="full",
        metadata={
            "help": "Covariance of the core: full (r² independent entries) or diag (r entries, as ScalaBL).",
            "choices": CORES,
        },
    )
    core_init: str = field(
        default="identity",
        metadata={"help": "Initial mean M_S: identity or orthogonal (random, seeded).", "choices": CORE_INITS},
    )
    sigma_init: float = field(
        default=0.1, metadata={"help": "Initial σ of every core entry, relative to the core's scale (rows of norm 1)."}
    )
    sigma_param: str = field(
        default="softplus", metadata={"help": "σ = softplus(ρ) or exp(ρ).", "choices": SIGMA_PARAMS}
    )
    prior_mean: str = field(
        default="identity",
        metadata={"help": "Mean of the Gaussian prior on S: identity or zero.", "choices": PRIOR_MEANS},
    )
    prior_std: float = field(default=1.0, metadata={"help": "Standard deviation of the prior on each entry of S."})

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.sigma_init <= 0:
            raise ValueError(f"{name}.sigma_init must be positive, got {self.sigma_init}")
        if self.prior_std <= 0:
            raise ValueError(f"{name}.prior_std must be positive, got {self.prior_std}")


@dataclass
class MeLoraConfig(MeLoraCoreOptions):
    """Me-LoRA: ΔW = s·B·S·A with deterministic A (r×n), B (m×r) and a random r×r core
    S = M_S + Σ_S ⊙ ε, ε_ij ~ N(0, 1), drawn once per example (options: :class:`MeLoraCoreOptions`).

    Trainable numbers per layer: r(n + m) + 2r² (``full``) or r(n + m) + 2r (``diag``), against BLoB's
    r(2n + m).
    """

    method_name: ClassVar[str] = "melora"
