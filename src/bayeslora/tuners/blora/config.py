"""Configuration of B-LoRA: LoRA with learned rank and bit-width per matrix (Meo et al., arXiv 2406.13046)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..melora.config import MeLoraCoreOptions
from .gates import BETA
from .quantizer import BIT_WIDTHS


@dataclass
class BLoraConfig(MeLoraCoreOptions):
    """B-LoRA: ΔW = s·Q(B)·diag(m ⊙ Q(e))·Q(A), with

    * rank gates: r − 1 nested hard-concrete gates, m_1 = 1, m_k = z_1·…·z_{k−1} (the learned rank is a
      prefix length; the first component is always kept);
    * Bayesian Bits residual quantizers Q for A, B and e, each with a learned clipping range [lo, hi] and
      nested gates for 4, 8, ... up to ``max_bits`` (2 bits is the floor);
    * e ∈ R^r a learned per-component scale (starts at 1).

    With ``bayesian_core`` the diagonal diag(m ⊙ Q(e)) is replaced by diag(m)·S·diag(m), S the Gaussian
    r×r core of Me-LoRA drawn once per example (its options are those of :class:`MeLoraCoreOptions`): an
    adapter that is both calibrated and compressed. With ``quantize_base`` the frozen weight W0 and the
    layer's input activations go through gated quantizers too, so that the base path's bit operations
    can shrink (the adapter path is a few percent of a layer's multiply-accumulates).

    The gates' prior, the penalty λ·E[cost] that favours switching them off, and the phases of training
    (warm-up with gates open, final phase with gates fixed) are training options of the run
    (``--gate-lambda``, ``--gate-cost``, ``--gate-warmup``, ``--gate-fix``), not of the saved adapter.
    """

    method_name: ClassVar[str] = "blora"

    bayesian_core: bool = field(
        default=False,
        metadata={"help": "Replace diag(e) by Me-LoRA's Gaussian r×r core S (rows/columns masked by the rank gates)."},
    )
    max_bits: int = field(
        default=16,
        metadata={"help": "Largest bit-width of A, B and e (2 is the floor).", "choices": BIT_WIDTHS},
    )
    rank_gate_init: float = field(
        default=3.0, metadata={"help": "Initial logit log α of every rank gate (3: P(gate on) ≈ 0.99)."}
    )
    bit_gate_init: float = field(
        default=3.0, metadata={"help": "Initial logit log α of every bit-width gate (3: P(gate on) ≈ 0.99)."}
    )
    gate_temperature: float = field(
        default=BETA, metadata={"help": "Temperature β of the hard-concrete gates (2/3 in Louizos et al.)."}
    )
    range_init_width: float = field(
        default=0.1,
        metadata={"help": "Width of a quantizer's initial range when its tensor is constant (B starts at 0)."},
    )
    quantize_base: bool = field(
        default=False,
        metadata={"help": "Also quantize the frozen weight W0 and the layer's input activations (gated)."},
    )
    base_max_bits: int = field(
        default=16,
        metadata={
            "help": "Largest bit-width of W0 and of the input activations (quantize_base).",
            "choices": BIT_WIDTHS,
        },
    )
    base_min_bits: int = field(
        default=4,
        metadata={
            "help": "Smallest bit-width of W0 and of the input activations (quantize_base): the floor of their "
            "quantizers. The frozen base cannot adapt to its quantization: on SmolLM2 the gates sampled at their "
            "initial logits over a 2-bit floor move the next-token distributions by KL 10 nats, over 4 bits by 0.7, "
            "over 8 bits by 0.003 (benchmarks/base_quantizer.py).",
            "choices": BIT_WIDTHS,
        },
    )
    activation_range: float = field(
        default=8.0,
        metadata={
            "help": "Initial clipping range ±a of the input activations (quantize_base); once the warm-up has "
            "shown the layer's inputs, their observed [min, max] replaces it when quantization starts."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base_min_bits > self.base_max_bits:
            raise ValueError(
                f"BLoraConfig.base_min_bits ({self.base_min_bits}) must not exceed base_max_bits ({self.base_max_bits})"
            )
        if self.gate_temperature <= 0:
            raise ValueError(f"BLoraConfig.gate_temperature must be positive, got {self.gate_temperature}")
        if self.range_init_width <= 0 or self.activation_range <= 0:
            raise ValueError("BLoraConfig.range_init_width and activation_range must be positive")
