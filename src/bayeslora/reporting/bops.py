"""Bit operations (BOPs) of adapted linear layers: what B-LoRA's learned ranks and bit-widths save.

BOPs of a matrix product = multiply-accumulates (MACs) × weight bits × activation bits. Per token, for a
linear layer y = W0 x (W0 ∈ R^{m×n}) with a low-rank adapter of kept rank r':

* base path:    n·m MACs at (bits of W0) × (bits of x);
* adapter path: A: r'·n MACs at bits(A) × bits(x); the middle: r' MACs at bits(e) × 16 (B-LoRA's scale
  vector) or r'² MACs at 32 × 16 (a full-precision Bayesian core); B: m·r' MACs at bits(B) × 16.

Conventions, stated in every report: activations that are not quantized, and the rank-r' intermediate,
count as 16-bit; so do W0 unless the base is quantized. The reference is the plain 16-bit LoRA of the same
maximal rank r (A and B at 16 bits, no middle factor) on a 16-bit base; for AdaLoRA, which starts above
its budget and prunes to an average rank, the LoRA of that average (target) rank. Attention's score and value
products and every other operation outside the adapted linear layers are not counted. BOPs for a
sequence are the per-token figures × its length.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from ..tuners.costs import DEFAULT_BITS, AdapterStructure, adapter_bops, base_bops, reference_adapter_bops


@dataclass
class LayerBops:
    """The per-token BOPs of one adapted layer and what they are made of."""

    name: str
    in_features: int
    out_features: int
    max_rank: int
    rank: int
    bits: dict[str, int]
    adapter: float
    base: float
    reference_adapter: float
    reference_base: float


def layer_bops(
    name: str, layer: nn.Module, adapter: str = "default", reference_rank: int | None = None
) -> LayerBops | None:
    """The BOPs of one adapter layer: a bayeslora layer with the structure it reports (B-LoRA's learned ranks and
    bits; the others at 16 bits and full rank, a Me-LoRA core counted as such); PEFT's LoRA at 16 bits (AdaLoRA with
    the ranks it kept). The reference is the 16-bit LoRA of rank ``reference_rank``, by default the layer's own
    (maximum) rank. None for other modules."""
    from peft.tuners.lora import LoraLayer

    from ..tuners.base import BayesianLowRankLayer

    if isinstance(layer, BayesianLowRankLayer):
        if not layer._has(adapter):
            return None
        structure = layer.adapter_structure(adapter)
    elif isinstance(layer, LoraLayer):
        if adapter not in layer.lora_A:
            return None
        rank = layer.r[adapter]
        if hasattr(layer, "lora_E"):  # AdaLoRA: the singular values it pruned to zero do not count
            rank = int((layer.lora_E[adapter] != 0).sum())
        structure = AdapterStructure(rank, {"A": DEFAULT_BITS, "B": DEFAULT_BITS})
    else:
        return None
    rank, bits = structure.rank, structure.bits
    n, m = layer.in_features, layer.out_features
    x_bits = bits.get("x", DEFAULT_BITS)
    return LayerBops(
        name=name,
        in_features=n,
        out_features=m,
        max_rank=layer.r[adapter],
        rank=rank,
        bits=bits,
        adapter=float(
            adapter_bops(
                n,
                m,
                rank,
                bits["A"],
                bits["B"],
                middle_bits=structure.middle_bits,
                core=structure.core,
                activation_bits=x_bits,
            )
        ),
        base=float(base_bops(n, m, bits.get("W", DEFAULT_BITS), x_bits)),
        reference_adapter=reference_adapter_bops(n, m, reference_rank or layer.r[adapter]),
        reference_base=float(base_bops(n, m)),
    )


def bops_report(model: nn.Module, sequence_length: int = 1, adapter: str = "default") -> dict[str, Any]:
    """BOPs of every adapted layer of ``model`` and in total, for ``sequence_length`` tokens.

    Returns ``{"layers": [...], "adapter", "base", "total", "reference_adapter", "reference_base",
    "reference_total", "adapter_ratio", "total_ratio", "sequence_length", "convention"}``; ratios are
    against the 16-bit LoRA of the same rank on a 16-bit base. For AdaLoRA, whose layers start at a larger
    rank and are pruned to an average budget (``target_r``), the reference is the LoRA of rank ``target_r``:
    the LoRA it is matched with.
    """
    if sequence_length <= 0:
        raise ValueError(f"sequence_length must be positive, got {sequence_length}")
    reference_rank = getattr(getattr(model, "peft_config", {}).get(adapter), "target_r", None)  # AdaLoRA's only
    layers = [
        found for name, module in model.named_modules() if (found := layer_bops(name, module, adapter, reference_rank))
    ]
    if not layers:
        raise ValueError("the model has no adapter layers to count bit operations for")
    totals = {
        key: sequence_length * sum(getattr(layer, key) for layer in layers)
        for key in ("adapter", "base", "reference_adapter", "reference_base")
    }
    totals["total"] = totals["adapter"] + totals["base"]
    totals["reference_total"] = totals["reference_adapter"] + totals["reference_base"]
    return {
        "sequence_length": sequence_length,
        **totals,
        "adapter_ratio": totals["adapter"] / totals["reference_adapter"],
        "total_ratio": totals["total"] / totals["reference_total"],
        "convention": (
            "per adapted linear layer: MACs x weight bits x activation bits; unquantized activations, the "
            "rank-r intermediate and an unquantized base count as 16-bit; reference = 16-bit LoRA of the same "
            "rank (AdaLoRA: of its target average rank) on a 16-bit base; attention products and other "
            "operations not counted"
        ),
        "layers": [asdict(layer) for layer in layers],
    }
