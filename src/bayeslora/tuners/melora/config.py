"""Configuration of Me-LoRA, memory-efficient Bayesian LoRA."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..base import LowRankBayesConfig

CORES = ("full", "diag")
CORE_INITS = ("identity", "orthogonal")
SIGMA_PARAMS = ("softplus", "exp")
PRIOR_MEANS = ("identity", "zero")
FACTOR_NORMS = ("unit", "free")
CORE_PRIORS = ("gaussian", "log-uniform")


@dataclass
class MeLoraCoreOptions(LowRankBayesConfig):
    """The options of a Gaussian r×r core S = M_S + Σ_S ⊙ ε, ε_ij ~ N(0, 1), drawn once per example
    (shared by Me-LoRA and by B-LoRA's Bayesian core). Choices and why:

    * ``factor_norm`` — how the scale of ΔW = s·B·S·A is shared. The factorisation has a scale freedom: scaling
      the core (its mean and its standard deviation) by u and B by 1/u leaves ΔW's distribution, hence the
      likelihood, unchanged, but not the KL of a prior on S. With ``unit`` A's rows and B's
      columns are normalised to unit length in the forward pass, ΔW = s·B̂·S·Â: the rescaling leaves B̂
      unchanged, so it changes the model, and the remaining freedoms (scaling A or B alone) change neither the
      model nor the KL: all of ΔW's scale lives in S, where its prior sees it. M_S then starts at zero (ΔW = 0:
      the posterior mean is an exact identity) and B at random directions of length 1. ``free`` (the default,
      until the comparison on held-out data says otherwise; the parametrisation of adapters saved before this
      option existed) keeps LoRA's factors as they are (B = 0 at the start, M_S full-rank), whose KL can be
      lowered by inflating S and shrinking B (see docs/methods.md).
    * ``core_init`` (``free`` only) — M_S starts full-rank (identity by default). With B = 0 at the start, a
      zero M_S would make every gradient zero (A's gradient goes through B·M_S, B's through M_S·A).
    * ``sigma_init`` — every entry of Σ_S starts at this value: in ``unit``, in the units of ΔW's coefficients
      on unit rank-1 directions (times s); in ``free``, relative to the core's initial rows of norm 1.
    * ``prior_mean`` — the prior on S is centred on the identity (``free``) or on zero (no update; ``unit``).
    * ``core_prior`` — ``gaussian``: N(prior_mean, prior_std²) on every entry of S, whose KL the rescaling above
      can lower with free factors. ``log-uniform``: p(|S_ij|) ∝ 1/|S_ij| (sparse variational dropout's prior),
      whose KL depends on each entry's σ/|M_S| only, so that no rescaling of (M_S, Σ_S, B) changes the objective
      with either factorisation; the posterior's width relative to its mean is then set by the data alone
      (``prior_mean`` and ``prior_std`` do not apply).
    """

    core: str = field(
        default="full",
        metadata={
            "help": "Covariance of the core: full (r² independent entries) or diag (r entries, as ScalaBL).",
            "choices": CORES,
        },
    )
    factor_norm: str = field(
        default="free",
        metadata={
            "help": "free: LoRA's factors as they are (B = 0, M_S full-rank at the start), whose KL rescaling S and "
            "B can lower; unit: A's rows and B's columns normalised to unit length, so that all of ΔW's scale lives "
            "in the core S and its prior cannot be lowered by rescaling (M_S starts at 0, B at random directions; "
            "train its core with --core-lr).",
            "choices": FACTOR_NORMS,
        },
    )
    core_init: str = field(
        default="identity",
        metadata={
            "help": "Initial mean M_S with --factor-norm free: identity or orthogonal (random, seeded); with unit it "
            "starts at zero.",
            "choices": CORE_INITS,
        },
    )
    sigma_init: float = field(
        default=0.1, metadata={"help": "Initial σ of every core entry, relative to the core's scale (rows of norm 1)."}
    )
    sigma_param: str = field(
        default="softplus", metadata={"help": "σ = softplus(ρ) or exp(ρ).", "choices": SIGMA_PARAMS}
    )
    prior_mean: str | None = field(
        default=None,
        metadata={
            "help": "Mean of the Gaussian prior on S: identity or zero (default: identity with free factors, zero "
            "with unit factors, whose core starts at zero).",
            "choices": PRIOR_MEANS,
        },
    )
    prior_std: float = field(default=1.0, metadata={"help": "Standard deviation of the prior on each entry of S."})
    core_prior: str = field(
        default="gaussian",
        metadata={
            "help": "Prior on each entry of S: gaussian (N(prior_mean, prior_std²)) or log-uniform (p(|s|) ∝ 1/|s|, "
            "scale-free: its KL depends on σ/|M_S| only, so rescaling the core and B cannot lower it).",
            "choices": CORE_PRIORS,
        },
    )

    def __post_init__(self) -> None:
        if self.prior_mean is None:
            self.prior_mean = "zero" if self.factor_norm == "unit" else "identity"
        super().__post_init__()
        name = type(self).__name__
        if self.sigma_init <= 0:
            raise ValueError(f"{name}.sigma_init must be positive, got {self.sigma_init}")
        if self.prior_std <= 0:
            raise ValueError(f"{name}.prior_std must be positive, got {self.prior_std}")

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """A config saved before ``factor_norm`` existed (bayeslora 0.1) holds no such key: its adapter was
        trained with LoRA's free factors and an identity-centred prior, and loads as such."""
        kwargs = super().check_kwargs(**kwargs)
        kwargs.setdefault("factor_norm", "free")
        kwargs.setdefault("prior_mean", "identity")
        return kwargs


@dataclass
class MeLoraConfig(MeLoraCoreOptions):
    """Me-LoRA: ΔW = s·B·S·A with deterministic A (r×n), B (m×r) and a random r×r core
    S = M_S + Σ_S ⊙ ε, ε_ij ~ N(0, 1), drawn once per example (options: :class:`MeLoraCoreOptions`).

    Trainable numbers per layer: r(n + m) + 2r² (``full``) or r(n + m) + 2r (``diag``), against BLoB's
    r(2n + m).
    """

    method_name: ClassVar[str] = "melora"
