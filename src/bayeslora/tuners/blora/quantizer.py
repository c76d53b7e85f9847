"""The Bayesian Bits residual quantizer (van Baalen et al., NeurIPS 2020) with a learned clipping range.

A tensor is clipped to its learned range [lo, hi] (width R = hi − lo) and put on the uniform b-bit grid
``lo + s_b·{0, …, 2^b − 1}`` with step s_b = R / (2^b − 1). Power-of-two widths are reached by residual
doubling, each step gated:

    s_2 = R/3,  s_{2b} = s_b / (2^b + 1)                       (so s_b = R / (2^b − 1))
    x_2 = lo + s_2·⌊(x − lo)/s_2⌉
    ε_4 = s_4·⌊(x − x_2)/s_4⌉,  ε_8 = s_8·⌊(x − x_2 − ε_4)/s_8⌉, …
    x_q = x_2 + z_4·(ε_4 + z_8·(ε_8 + z_16·(ε_16 + z_32·ε_32)))

A higher floor b_0 (4 or 8 bits; B-LoRA's base quantizer, see ``base_min_bits``) starts the chain at
x_{b_0} and gates only the doublings above it.

Rounding uses the straight-through estimator (the gradient of ⌊v⌉ is taken as 1), so x_q is
differentiable in x (inside the range), in the range ends (through clipping and the steps) and in the
gates. With binary gates the chain equals direct rounding on the finest active grid,
``lo + s_b·⌊(x − lo)/s_b⌉`` (up to ties, and at 16 bits up to float32 rounding of the residuals, which can
move a value by one 16-bit step), which is what evaluation and export compute: a b-bit tensor then takes
at most 2^b distinct values, because the range clips it.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The bit-widths the residual quantizer can reach, smallest first.
BIT_WIDTHS = (2, 4, 8, 16, 32)
#: The narrowest range width, relative to 1 + |lo| (a learned range never collapses to a zero step).
MIN_RANGE = 1e-5


def bit_gate_widths(max_bits: int, min_bits: int = 2) -> tuple[int, ...]:
    """The widths that have a gate (every width above the floor ``min_bits`` up to ``max_bits``):
    16 → (4, 8, 16); 16 with floor 8 → (16,)."""
    for name, bits in (("max_bits", max_bits), ("min_bits", min_bits)):
        if bits not in BIT_WIDTHS:
            raise ValueError(f"{name} must be one of {', '.join(map(str, BIT_WIDTHS))}, got {bits}")
    if min_bits > max_bits:
        raise ValueError(f"min_bits ({min_bits}) must not exceed max_bits ({max_bits})")
    return tuple(b for b in BIT_WIDTHS if min_bits < b <= max_bits)


def bits_of(gates: Tensor | list[float], widths: tuple[int, ...], min_bits: int = 2) -> int:
    """The bit-width selected by binary nested gates (one per width in ``widths``): the floor ``min_bits``
    plus every doubling whose gate, and all gates before it, are on."""
    bits = min_bits
    for gate, width in zip([float(g) for g in gates], widths, strict=True):
        if gate < 0.5:
            break
        bits = width
    return bits


def _round_ste(value: Tensor) -> Tensor:
    """⌊v⌉ forward, identity backward."""
    return value + (torch.round(value) - value).detach()


def clip_to_range(x: Tensor, bounds: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(clipped x, lo, hi)`` with ``bounds = (lo, hi)``, the width kept above ``MIN_RANGE·(1 + |lo|)``
    (relative, so that a collapsed range never makes a zero step whatever the magnitude of lo).
    Differentiable in x inside the range and in the bounds where x is clipped.

    The levels are ``lo + s_b·k``: for a range symmetric about 0, zero falls between the two middle levels
    (a zero weight becomes ±s_b/2). Anchoring lo to a multiple of s_2 would put 0 on every grid but shift
    the range by up to s_2/2, clipping a 32-bit tensor at the 2-bit scale; the quantizers instead start
    after the warm-up, from ranges set on weights that have moved away from their zero initialisation."""
    # computed in the range's precision at least: a bf16 or fp16 input (a half-precision base's W0 or activations)
    # has too few significant bits for a fine grid, and fp16 overflows on (x − lo)/s at 16 bits (65,535 levels)
    x = x.to(torch.promote_types(x.dtype, bounds.dtype))
    lo = bounds[0]
    hi = torch.maximum(bounds[1], lo + MIN_RANGE * (1 + lo.detach().abs()))
    return torch.minimum(torch.maximum(x, lo), hi), lo, hi


def step_size(lo: Tensor, hi: Tensor, bits: int) -> Tensor:
    """s_b = (hi − lo) / (2^b − 1)."""
    return (hi - lo) / (2.0**bits - 1.0)


def quantize_residual(x: Tensor, bounds: Tensor, gates: Tensor, min_bits: int = 2) -> Tensor:
    """The gated residual quantizer: ``x`` on the grid of the floor ``min_bits`` (2 in Bayesian Bits) plus
    the gated residuals of each doubling above it, one gate per width (``gates`` is (k,), values in [0, 1];
    nested as in the module docstring, which starts at 2 bits)."""
    x, lo, hi = clip_to_range(x, bounds)
    first = BIT_WIDTHS.index(min_bits)
    widths = BIT_WIDTHS[first : first + gates.shape[0] + 1]
    s = step_size(lo, hi, min_bits)
    x_floor = lo + s * _round_ste((x - lo) / s)
    reached, residuals = x_floor, []
    for bits in widths[1:]:
        s = step_size(lo, hi, bits)
        eps = s * _round_ste((x - reached) / s)  # ε_b on the residual of every coarser level
        residuals.append(eps)
        reached = reached + eps
    gated = torch.zeros_like(x)
    for eps, gate in zip(reversed(residuals), reversed(gates.unbind(0)), strict=True):
        gated = gate * (eps + gated)  # z_b·(ε_b + z_2b·(…))
    return x_floor + gated


def quantize_fixed(x: Tensor, bounds: Tensor, bits: int) -> Tensor:
    """``x`` clipped to ``bounds`` and rounded to the b-bit grid ``lo + s_b·{0, …, 2^b − 1}`` (straight-through
    gradient): the residual quantizer with binary gates, computed directly."""
    x, lo, hi = clip_to_range(x, bounds)
    s = step_size(lo, hi, bits)
    return lo + s * _round_ste((x - lo) / s)


def integer_codes(x: Tensor, bounds: Tensor, bits: int) -> tuple[Tensor, float, float]:
    """``(codes, lo, step)`` with ``x ≈ lo + step·codes``, codes integers in [0, 2^b − 1] (int64, on the CPU)."""
    with torch.no_grad():
        x, lo, hi = clip_to_range(x.detach().float().cpu(), bounds.detach().float().cpu())
        s = step_size(lo, hi, bits)
        codes = torch.round((x - lo) / s).clamp(0, 2**bits - 1).long()
    return codes, float(lo), float(s)


def initial_bounds(x: Tensor, min_width: float, per_row: bool = False) -> Tensor:
    """``(lo, hi)`` = the tensor's min and max, widened symmetrically to at least ``min_width``: shape (2,),
    or with ``per_row`` (2, m, 1), the range of each row of an (m, n) matrix (per output channel)."""
    with torch.no_grad():
        lo, hi = (x.amin(1, keepdim=True), x.amax(1, keepdim=True)) if per_row else (x.min(), x.max())
        return widened(lo, hi, min_width)


def widened(lo: Tensor, hi: Tensor, min_width: float) -> Tensor:
    """``stack(lo, hi)`` with every range narrower than ``min_width`` widened symmetrically to it."""
    pad = (min_width - (hi - lo)).clamp(min=0) / 2
    return torch.stack([lo - pad, hi + pad])
