"""Bit operations (BOPs) of a linear layer with a low-rank adapter, per token: the formulas.

BOPs of a matrix product = multiply-accumulates (MACs) × weight bits × activation bits. Per token, for a
linear layer y = W0 x (W0 ∈ R^{m×n}) with a low-rank adapter of kept rank r':

* base path:    n·m MACs at (bits of W0) × (bits of x);
* adapter path: A: r'·n MACs at bits(A) × bits(x); the middle: r' MACs at bits(e) × 16 (B-LoRA's scale
  vector) or r'² MACs at 32 × 16 (a full-precision Bayesian core); B: m·r' MACs at bits(B) × 16.

Unquantized activations and the rank-r' intermediate count as 16-bit. The functions accept tensors (expected
values under B-LoRA's gates) as well as numbers. :mod:`bayeslora.reporting.bops` applies them to a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

#: Bits of everything that is not quantized (activations, intermediate products, an unquantized base).
DEFAULT_BITS = 16
#: Bits of a full-precision Bayesian core (fp32).
CORE_BITS = 32

Number = float | Tensor


def adapter_bops(
    n: int,
    m: int,
    rank: Number,
    bits_a: Number,
    bits_b: Number,
    *,
    middle_bits: Number | None = None,
    core: str | None = None,
    rank_squared: Number | None = None,
    activation_bits: Number = DEFAULT_BITS,
) -> Number:
    """Per-token BOPs of the adapter path. ``middle_bits``: bits of B-LoRA's scale vector e (None: no
    middle factor, plain LoRA); ``core``: a full-precision core instead, ``full`` (r'×r': r'² MACs,
    ``rank_squared`` = E[r'²] when ``rank`` is an expectation) or ``diag`` (r' MACs). Accepts tensors (expected
    values) for the regulariser."""
    total = rank * n * bits_a * activation_bits + m * rank * bits_b * DEFAULT_BITS
    if core == "diag":
        total = total + rank * CORE_BITS * DEFAULT_BITS
    elif core is not None:
        total = total + (rank * rank if rank_squared is None else rank_squared) * CORE_BITS * DEFAULT_BITS
    elif middle_bits is not None:
        total = total + rank * middle_bits * DEFAULT_BITS
    return total


def base_bops(n: int, m: int, weight_bits: Number = DEFAULT_BITS, activation_bits: Number = DEFAULT_BITS) -> Number:
    """Per-token BOPs of the frozen product W0 x."""
    return n * m * weight_bits * activation_bits


def reference_adapter_bops(n: int, m: int, rank: int) -> float:
    """Per-token BOPs of the 16-bit LoRA of rank ``rank`` (the reference)."""
    return float(adapter_bops(n, m, rank, DEFAULT_BITS, DEFAULT_BITS))


@dataclass(frozen=True)
class AdapterStructure:
    """What the bit operations of one adapter of a layer depend on: its kept rank, the bits of each quantized
    tensor (16 when not quantized), the bits of a middle scale vector (None if there is none) and the kind of a
    full-precision core between the factors (``full``, ``diag`` or None)."""

    rank: int
    bits: dict[str, int]
    middle_bits: int | None = None
    core: str | None = None
