"""The B-LoRA layer: learned rank (nested hard-concrete gates) and learned bit-widths (Bayesian Bits).

    y = Q_W(W0)·Q_x(x) + s·Q(B)·diag(m ⊙ Q(e))·Q(A)·Q_x(x)          (Q_W, Q_x only with quantize_base)

or, with a Bayesian core, ``s·Q(B)·diag(m)·S·diag(m)·Q(A)·x`` with S Me-LoRA's Gaussian r×r core.

Gates behave according to each adapter's *phase*, set for the whole model by the training schedule
(:class:`~bayeslora.methods.blora.GateSchedule`):

* ``open`` — every gate on, nothing quantized (the warm-up: plain LoRA with a scale vector);
* ``sample`` — in training, a hard-concrete sample of every gate per forward pass; in evaluation, the
  deterministic gates (on when P(z = 0) < 0.34);
* ``fixed`` — the deterministic gates in training too (the final phase: the structure is frozen and the
  weights adapt to it).

A new adapter starts ``open``, so that it is an exact identity (B = 0, nothing quantized) and trains as LoRA
until a schedule moves it on; the phase is saved with the adapter (``blora_phase``), so that a trained adapter
loads in the phase it was saved in. Adapters saved before the phase was recorded load as ``sample``, the phase
training ended in.

Shapes in comments: R rows, T tokens, n = in_features, m = out_features, r the maximal rank.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from torch import Tensor, nn

from ..base import BayesianLowRankLayer, gaussian_factor_width
from ..costs import AdapterStructure
from ..melora.layer import SampledCoreMixin
from .config import BLoraConfig
from .gates import deterministic_gates, nested, nested_expected_cost, prefix_length, prob_nonzero, sample_gates
from .quantizer import bit_gate_widths, bits_of, initial_bounds, quantize_fixed, quantize_residual, widened

PHASES = ("open", "sample", "fixed")
#: The bits reported for a tensor that is not quantized (the open phase), as the BOPs convention counts it.
UNQUANTIZED_BITS = 16
#: Bits added by each doubling gate: 2 → 4 adds 2, 4 → 8 adds 4, ...
_BIT_STEPS = {4: 2.0, 8: 4.0, 16: 8.0, 32: 16.0}


class BLoraLayer(SampledCoreMixin, BayesianLowRankLayer):
    """B-LoRA on one ``nn.Linear``.

    Parameters per adapter (all created with the adapter, none on a first forward):
    ``blora_A`` (r, n), ``blora_B`` (m, r), ``blora_e`` (r,) or the core ``blora_core`` / ``blora_core_rho``;
    ``blora_rank`` (r − 1,) rank-gate logits; for every quantized tensor t ∈ {A, B, e} (and W, x with
    ``quantize_base``) ``blora_<t>_range`` its clipping range [lo, hi], (2,), and ``blora_<t>_bits`` (k,) the
    logits of its bit-width gates. The frozen weight W0 (m, n) is quantized per output channel: its range is
    (2, m, 1), one [lo, hi] per row, as 4-bit weight quantization of language models needs.
    """

    adapter_layer_names = (
        "blora_A",
        "blora_B",
        "blora_e",
        "blora_core",
        "blora_core_rho",
        "blora_rank",
        "blora_A_range",
        "blora_A_bits",
        "blora_B_range",
        "blora_B_bits",
        "blora_e_range",
        "blora_e_bits",
        "blora_W_range",
        "blora_W_bits",
        "blora_x_range",
        "blora_x_bits",
    )
    variance_parameter_names = ("blora_core_rho",)
    gate_parameter_names: ClassVar[tuple[str, ...]] = tuple(
        n for n in adapter_layer_names if n.endswith(("_bits", "_rank"))
    )
    other_param_names = (
        *BayesianLowRankLayer.other_param_names,
        "core",
        "sigma_param",
        "prior_mean",
        "prior_std",
        "bayesian_core",
        "factor_norm",
        "core_prior",
        "max_bits",
        "base_max_bits",
        "base_min_bits",
        "quantize_base",
        "blora_x_seen",
        "blora_phase",
        "gate_temperature",
    )
    core_mean_name = "blora_core"
    core_rho_name = "blora_core_rho"

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: BLoraConfig, bayesian: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(base_layer, **kwargs)
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict({}))
        self._init_core_options()
        self.bayesian_core: dict[str, bool] = {}
        self.max_bits: dict[str, int] = {}
        self.base_max_bits: dict[str, int] = {}
        self.base_min_bits: dict[str, int] = {}
        self.quantize_base: dict[str, bool] = {}
        self.gate_temperature: dict[str, float] = {}
        # the phase of each adapter, as its index in PHASES (a float buffer: PEFT casts adapter buffers to the base's
        # float dtype); saved with the adapter. `_phases` mirrors it in Python, so that forward never reads a tensor
        self.blora_phase = BufferDict({}, persistent=True)
        self._phases: dict[str, str] = {}
        # (2,) [min, max] of the inputs seen in training since the last range calibration, [inf, -inf] if none:
        # state saved in checkpoints, so that a run resumed in the warm-up sets the range an uninterrupted one would
        self.blora_x_seen = BufferDict({}, persistent=True)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, bayesian=bayesian)

    # --- construction ---
    def update_layer(self, adapter_name: str, config: BLoraConfig, bayesian: bool = True, **kwargs: Any) -> None:
        """Create adapter ``adapter_name``: LoRA's initialisation for A (Kaiming-uniform) and B (zero), e = 1
        (or Me-LoRA's core, deterministic with ``bayesian=False``), gate logits from the config, ranges from the
        initial tensors."""
        r = config.r
        self._register_common(adapter_name, r, config.lora_alpha, config.lora_dropout, bayesian)
        self.bayesian_core[adapter_name] = config.bayesian_core
        self.max_bits[adapter_name] = config.max_bits
        self.base_max_bits[adapter_name] = config.base_max_bits
        self.base_min_bits[adapter_name] = config.base_min_bits
        self.quantize_base[adapter_name] = config.quantize_base
        self.gate_temperature[adapter_name] = config.gate_temperature
        self.blora_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
        nn.init.kaiming_uniform_(self.blora_A[adapter_name], a=math.sqrt(5))
        if config.bayesian_core:  # B random with a unit-factor core (M_S = 0), else LoRA's zero
            self.blora_B[adapter_name] = self.initial_b(adapter_name, config, self.out_features, r)
            self._create_core(adapter_name, config, r)
        else:
            self.blora_B[adapter_name] = nn.Parameter(torch.zeros(self.out_features, r))
            self.blora_e[adapter_name] = nn.Parameter(torch.ones(r))
        self.blora_rank[adapter_name] = nn.Parameter(torch.full((r - 1,), float(config.rank_gate_init)))
        for tensor in self.quantized_tensors(adapter_name):
            widths = self._gate_widths(tensor, adapter_name)
            getattr(self, f"blora_{tensor}_bits")[adapter_name] = nn.Parameter(
                torch.full((len(widths),), float(config.bit_gate_init))
            )
            shape = (2, self.out_features, 1) if tensor == "W" else (2,)  # W0 per output channel
            getattr(self, f"blora_{tensor}_range")[adapter_name] = nn.Parameter(torch.zeros(shape))
        if config.quantize_base:
            self.blora_x_seen[adapter_name] = torch.tensor([math.inf, -math.inf])
        self.blora_phase[adapter_name] = torch.zeros(())
        self.set_phase("open", adapter_name)
        self.calibrate_ranges(adapter_name, config.range_init_width, activation_range=config.activation_range)
        self._finish_update(adapter_name, config.inference_mode)

    def quantized_tensors(self, adapter: str) -> tuple[str, ...]:
        """Names of the tensors this adapter quantizes: A, B, e (without a Bayesian core), W and x."""
        names = ("A", "B") if self.bayesian_core[adapter] else ("A", "B", "e")
        return (*names, "W", "x") if self.quantize_base[adapter] else names

    def _bit_range(self, tensor: str, adapter: str) -> tuple[int, int]:
        """``(largest, smallest)`` bit-width of ``tensor``: the base path's (W, x) or the adapter's (floor 2)."""
        if tensor in ("W", "x"):
            return self.base_max_bits[adapter], self.base_min_bits[adapter]
        return self.max_bits[adapter], 2

    def _gate_widths(self, tensor: str, adapter: str) -> tuple[int, ...]:
        return bit_gate_widths(*self._bit_range(tensor, adapter))

    def _tensor(self, name: str, adapter: str) -> Tensor:
        if name == "W":
            return self.get_base_layer().weight
        return getattr(self, f"blora_{name}")[adapter]

    @torch.no_grad()
    def calibrate_ranges(self, adapter: str, min_width: float = 0.1, activation_range: float | None = None) -> None:
        """Set the clipping range of every quantized weight tensor to its current [min, max] (per output
        channel for W0; widened to ``min_width`` if constant), and that of the activations to
        ±``activation_range`` if given, else to the [min, max] of the inputs seen in training since the last
        calibration (the warm-up, over every process), if any. Called at construction and when
        quantization starts after the warm-up."""
        for name in self.quantized_tensors(adapter):
            bounds = getattr(self, f"blora_{name}_range")[adapter]
            if name == "x":
                seen = self.blora_x_seen[adapter]
                if activation_range is not None:
                    bounds.copy_(torch.tensor([-activation_range, activation_range]))
                elif bool(torch.isfinite(seen).all()):
                    bounds.copy_(widened(seen[0], seen[1], min_width))
                seen.copy_(torch.tensor([math.inf, -math.inf]))
                continue
            bounds.copy_(initial_bounds(self._tensor(name, adapter).detach(), min_width, per_row=name == "W"))

    @torch.no_grad()
    def _observe_input(self, x: Tensor, adapter: str) -> None:
        """Widen the observed input range of ``adapter`` to include ``x`` and the other processes' inputs of
        this step (agreed at every step: DDP copies rank 0's buffers to the others before each forward)."""
        seen = self.blora_x_seen[adapter]
        low, high = _reduce_extremes(x.min().to(seen.dtype), x.max().to(seen.dtype))
        seen.copy_(torch.stack([torch.minimum(seen[0], low), torch.maximum(seen[1], high)]))

    # --- phases ---
    def phase_of(self, adapter: str) -> str:
        """The phase of ``adapter``: open, sample or fixed (see the module docstring)."""
        return self._phases[adapter]

    def set_phase(self, phase: str, adapter: str | None = None) -> None:
        """Put ``adapter`` (every adapter of the layer when None) in ``phase``."""
        if phase not in PHASES:
            raise ValueError(f"unknown gate phase '{phase}': {', '.join(PHASES)}")
        for name in [adapter] if adapter is not None else list(self._phases):
            self._phases[name] = phase
            self.blora_phase[name].fill_(PHASES.index(phase))

    @property
    def phase(self) -> str:
        """The phase of the layer's first active adapter (of its first adapter if none is active)."""
        active = [a for a in self.active_adapters if a in self._phases]
        return self._phases[(active or list(self._phases))[0]]

    @phase.setter
    def phase(self, phase: str) -> None:
        self.set_phase(phase)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        """After loading, the Python mirror of each adapter's phase follows the loaded ``blora_phase``; an adapter
        whose state has weights but no phase (saved before the phase was recorded) is in ``sample``, the phase
        its training ended in."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        for adapter in self._phases:
            saved = state_dict.get(f"{prefix}blora_phase.{adapter}")
            if saved is not None:
                self._phases[adapter] = PHASES[round(float(saved))]
            elif f"{prefix}blora_A.{adapter}" in state_dict:
                self.set_phase("sample", adapter)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._phases.pop(adapter_name, None)

    # --- gates ---
    def _gates(self, logits: Tensor, adapter: str) -> Tensor:
        """The gate values of this forward pass (see the module docstring for the phases)."""
        beta = self.gate_temperature[adapter]
        if self.training and self.phase_of(adapter) == "sample":
            return sample_gates(logits, beta)
        return deterministic_gates(logits, beta)

    def rank_mask(self, adapter: str) -> Tensor:
        """m ∈ [0, 1]^r: m_1 = 1, m_k = z_1·…·z_{k−1} (all ones in the open phase)."""
        logits = self.blora_rank[adapter]
        first = torch.ones(1, device=logits.device, dtype=logits.dtype)  # the first component is always kept
        if self.phase_of(adapter) == "open":
            return first.expand(logits.shape[0] + 1)
        return torch.cat([first, nested(self._gates(logits, adapter))])

    def quantize(self, name: str, value: Tensor, adapter: str) -> Tensor:
        """``value`` through the gated quantizer of tensor ``name`` (identity in the open phase)."""
        if self.phase_of(adapter) == "open":
            return value
        logits = getattr(self, f"blora_{name}_bits")[adapter]
        bounds = getattr(self, f"blora_{name}_range")[adapter]
        gates = self._gates(logits, adapter)
        floor = self._bit_range(name, adapter)[1]
        if self.training and self.phase_of(adapter) == "sample":
            return quantize_residual(value, bounds, gates, floor)
        return quantize_fixed(value, bounds, bits_of(gates, self._gate_widths(name, adapter), floor))

    # --- forward ---
    def _base_quantizer(self) -> str | None:
        """The active adapter that quantizes the base path, if any."""
        return next((a for a in self.active_adapters if self._has(a) and self.quantize_base[a]), None)

    def layer_input(self, x: Tensor) -> Tensor:
        """Q_x(x) when an active adapter quantizes the base path (one gate sample for both paths)."""
        adapter = self._base_quantizer()
        if adapter is None:
            return x
        if self.training and self.phase_of(adapter) == "open":  # the warm-up shows the activations' range
            self._observe_input(x, adapter)
        # quantized in the range's fp32, then back to the base's dtype (a bf16 base keeps ~8 significant bits)
        return self.quantize("x", x, adapter).to(x.dtype)

    def base_output(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Q_W(W0)·x when an active adapter quantizes the base path (x is already Q_x(x))."""
        adapter = self._base_quantizer()
        if adapter is None:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        weight = self.quantize("W", base.weight, adapter).to(x.dtype)  # (m, n), quantized in fp32
        return F.linear(x, weight, base.bias)

    def adapter_code(self, x: Tensor, adapter: str) -> tuple[Tensor, Tensor]:
        """``(C·Q(A)·x, Q(B))`` (unit-normalised with a unit-factor core), C the gated core: diag(m ⊙ Q(e)) or the
        masked Bayesian core S."""
        A = self.quantize("A", self.blora_A[adapter], adapter)  # (r, n)
        B = self.quantize("B", self.blora_B[adapter], adapter)  # (m, r)
        A, B = self.scaled_factors(A, B, adapter)  # a core with unit factors: unit rows of A, columns of B
        mask = self.rank_mask(adapter)  # (r,)
        h = x @ A.T  # (R, T, n) @ (n, r) -> (R, T, r)
        if self.bayesian_core[adapter]:
            h = self.core_product(h * mask, adapter) * mask  # rows and columns of S masked
        else:
            h = h * (mask * self.quantize("e", self.blora_e[adapter], adapter))  # diag(m ⊙ Q(e))
        return h, B  # (R, T, r), (m, r)

    # --- the deterministic adapter, learned structure, costs ---
    def effective_factors(self, adapter: str) -> tuple[Tensor, Tensor]:
        """``(A', B')`` of the deterministic adapter truncated to its learned rank r', dequantized, with
        ``s·B'·A'`` its (posterior-mean) ΔW: A' (r', n) = Q(A)[:r'], B' (m, r') = s·Q(B)[:, :r']·C, where C is
        diag(Q(e))[:r', :r'] or the core mean M_S[:r', :r']."""
        with evaluation_gates(self):
            rank = self.learned_rank(adapter)
            A, B = self.scaled_factors(
                self.quantize("A", self.blora_A[adapter], adapter),
                self.quantize("B", self.blora_B[adapter], adapter),
                adapter,
            )
            A, B = A[:rank], B[:, :rank]
            if self.bayesian_core[adapter]:
                core = self.mean_core_matrix(adapter)[:rank, :rank]
            else:
                core = torch.diag(self.quantize("e", self.blora_e[adapter], adapter)[:rank])
        return A, self.scaling[adapter] * (B @ core)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if any(self.quantize_base.get(a, False) for a in (adapter_names or self.active_adapters)):
            raise ValueError(
                "A B-LoRA adapter that quantizes the base weight cannot be merged into it: the merged layer "
                "would lose the learned base quantization. Keep it as an adapter (load it after import bayeslora)."
            )
        super().merge(safe_merge, adapter_names)

    def learned_rank(self, adapter: str) -> int:
        """r' = 1 + the number of leading rank gates on (deterministic gates; r in the open phase)."""
        if self.phase_of(adapter) == "open":
            return self.r[adapter]
        logits = self.blora_rank[adapter]
        return 1 + prefix_length(deterministic_gates(logits, self.gate_temperature[adapter]))

    def learned_bits(self, adapter: str) -> dict[str, int]:
        """The bit-width of every quantized tensor (deterministic gates; 16 in the open phase)."""
        found = {}
        for name in self.quantized_tensors(adapter):
            if self.phase_of(adapter) == "open":  # nothing quantized: counted at the 16 bits of the BOPs convention
                found[name] = UNQUANTIZED_BITS
                continue
            logits = getattr(self, f"blora_{name}_bits")[adapter]
            gates = deterministic_gates(logits, self.gate_temperature[adapter])
            found[name] = bits_of(gates, self._gate_widths(name, adapter), self._bit_range(name, adapter)[1])
        return found

    def adapter_structure(self, adapter: str) -> AdapterStructure:
        """The learned structure: kept rank, bits of every quantized tensor, e's bits or the core's kind."""
        bits = self.learned_bits(adapter)
        if self.bayesian_core[adapter]:
            return AdapterStructure(self.learned_rank(adapter), bits, core=self.core[adapter])
        return AdapterStructure(self.learned_rank(adapter), bits, middle_bits=bits["e"])

    def expected_rank(self, adapter: str) -> Tensor:
        """E[r'] = 1 + Σ_k Π_{j≤k} P(z_j ≠ 0) (differentiable in the rank logits)."""
        return 1 + nested_expected_cost(self.blora_rank[adapter], 1.0, self.gate_temperature[adapter])

    def expected_bits(self, name: str, adapter: str) -> Tensor:
        """E[b] = b_0 + Σ_k Δ_k Π_{j≤k} P(z_j ≠ 0): the floor b_0 (2, or the base's) plus Δ = (2, 4, 8, 16),
        the bits each doubling adds."""
        logits = getattr(self, f"blora_{name}_bits")[adapter]
        widths = self._gate_widths(name, adapter)
        steps = torch.tensor([_BIT_STEPS[w] for w in widths], device=logits.device, dtype=logits.dtype)
        return self._bit_range(name, adapter)[1] + nested_expected_cost(logits, steps, self.gate_temperature[adapter])

    def expected_open_gates(self, adapter: str) -> tuple[Tensor, int]:
        """``(Σ over the layer's gate chains of Σ_k Π_{j≤k} P(z_j ≠ 0), number of gates)``: the expected
        number of gates on, counted with their nesting (the ``gates`` cost)."""
        beta = self.gate_temperature[adapter]
        logits = [self.blora_rank[adapter]] + [
            getattr(self, f"blora_{t}_bits")[adapter] for t in self.quantized_tensors(adapter)
        ]
        total = sum(nested_expected_cost(chain, 1.0, beta) for chain in logits)
        return total, sum(chain.numel() for chain in logits)

    def gate_probabilities(self, adapter: str) -> dict[str, list[float]]:
        """P(z ≠ 0) of every gate, by chain (for logs and reports)."""
        beta = self.gate_temperature[adapter]
        chains = {"rank": self.blora_rank[adapter]}
        chains.update({t: getattr(self, f"blora_{t}_bits")[adapter] for t in self.quantized_tensors(adapter)})
        return {name: prob_nonzero(logits.detach(), beta).tolist() for name, logits in chains.items()}

    def kl(self, adapter: str) -> Tensor:
        """KL of the Bayesian core (0 without one: the gates enter the loss through their cost)."""
        if self.bayesian_core[adapter]:
            return self.core_kl(adapter)
        return torch.zeros((), dtype=torch.float64, device=self.blora_A[adapter].device)

    def posterior_width(self, adapter: str) -> dict[str, float | None] | None:
        """Of a Bayesian core, as the evaluation uses it: dequantized factors, and the rows and columns of S that
        the rank gates keep (weighted by their masks); None without one."""
        if not self.bayesian_core[adapter] or self.posterior_std(adapter).numel() == 0:
            return None  # no core, or a deterministic one (below --bayesian-layers last:K)
        with torch.no_grad(), evaluation_gates(self):
            A, B = self.scaled_factors(
                self.quantize("A", self.blora_A[adapter], adapter),
                self.quantize("B", self.blora_B[adapter], adapter),
                adapter,
            )
            mask = self.rank_mask(adapter)  # (r,)
            kept = mask > 0
            mean, std = self.core_mean(adapter), self.posterior_std(adapter)
            if mean.dim() == 2:
                mean, std = mean[kept][:, kept], std[kept][:, kept]
            else:
                mean, std = mean[kept], std[kept]
            left = self.scaling[adapter] * B[:, kept] * mask[kept]  # (m, r')
            right = mask[kept, None] * A[kept]  # (r', n)
            return gaussian_factor_width(left, mean, std, right, self.get_base_layer().weight)

    def posterior_std(self, adapter: str) -> Tensor:
        """Σ_S of a Bayesian core (empty without one)."""
        if self.bayesian_core[adapter]:
            return super().posterior_std(adapter)
        return self.blora_A[adapter].new_zeros(0)


def _reduce_extremes(low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
    """``(min over processes of low, max over processes of high)``, elementwise (``low``/``high`` as they are on a
    single process), so that the input ranges observed on each process's share of the data agree."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        low, high = low.clone(), high.clone()
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    return low, high


@contextlib.contextmanager
def evaluation_gates(layer: nn.Module) -> Iterator[None]:
    """Within the block ``layer`` uses its evaluation-time gates (the open phase is left as it is)."""
    training = layer.training
    layer.training = False
    try:
        yield
    finally:
        layer.training = training
