"""Configuration of BLoB, Bayesian LoRA by backpropagation (Wang et al., NeurIPS 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..base import LowRankBayesConfig

#: How flipout's signs are held (see :attr:`BlobConfig.flipout_signs`).
FLIPOUT_SIGNS = ("int8", "reference")


@dataclass
class BlobConfig(LowRankBayesConfig):
    """BLoB: B deterministic; a mean-field Gaussian q(A_ij) = N(M_ij, σ_ij²) on every entry of A, with
    σ = G² and G initialised U(init_eps/√2, init_eps); prior N(0, prior_std²) on each entry of A;
    flipout with random signs per token. Trainable numbers per layer: r(2n + m).
    Defaults are the paper's (ε = 0.05, prior std 0.2)."""

    method_name: ClassVar[str] = "blob"

    init_eps: float = field(default=0.05, metadata={"help": "G starts U(ε/√2, ε), so σ = G² starts in [ε²/2, ε²]."})
    prior_std: float = field(default=0.2, metadata={"help": "Standard deviation of the N(0, σ_p²) prior on A."})
    flipout_signs: str = field(
        default="int8",
        metadata={
            "help": "How flipout's random ±1 signs are held: int8 (one byte each, kept for the backward pass at a "
            "quarter of float32's memory, drawn with randint) or reference (in the input's dtype, drawn with "
            "bernoulli, the layout of the BLoB reference implementation, for comparisons). Both draw independent "
            "fair signs."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_eps <= 0:
            raise ValueError(f"BlobConfig.init_eps must be positive, got {self.init_eps}")
        if self.prior_std <= 0:
            raise ValueError(f"BlobConfig.prior_std must be positive, got {self.prior_std}")
        if self.flipout_signs not in FLIPOUT_SIGNS:
            raise ValueError(
                f"BlobConfig.flipout_signs must be one of {', '.join(FLIPOUT_SIGNS)}, got {self.flipout_signs!r}"
            )
