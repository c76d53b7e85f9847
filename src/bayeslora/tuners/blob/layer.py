"""The BLoB layer: a Gaussian on every entry of A, sampled with flipout.

y = W0 x + s·B·M·x + s·B[((x ⊙ r_A)·Eᵀ) ⊙ s_A],   E = σ ⊙ ε,   σ = G²,

with r_A ∈ {±1}^(R, T, n) and s_A ∈ {±1}^(R, T, r) random signs per token. As in the reference
implementation one noise matrix E is drawn per forward pass; when a pass holds N posterior copies of a
batch (batched sampling, see :mod:`bayeslora.sampling`), each copy draws its own E, which is exactly N
reference passes in one. The (R, T, n) sign tensor kept for the backward pass is BLoB's memory cost: held in int8 by
default (a quarter of float32's bytes), or in the input's dtype as the reference does (``flipout_signs="reference"``).

Inside :func:`~bayeslora.sampling.frozen_samples` (generation: one weight sample per sequence for all its
tokens) flipout's per-token signs would give every token its own weights, so each sequence (row, or example
when announced) instead draws its own A = M + σ ⊙ ε once and keeps it: y = W0 x + s·B·A_row·x.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..base import BayesianLowRankLayer, gaussian_factor_width, gaussian_kl, positive
from ..sampling import current_row_copies, current_row_examples, frozen, frozen_noise
from .config import BlobConfig


def _random_signs(shape: torch.Size, like: Tensor, compact: bool = True) -> Tensor:
    """Independent fair ±1 signs of ``shape``: int8 when ``compact`` (what autograd keeps for the backward pass is
    then one byte per sign, and ``randint`` draws them ~4x faster than ``bernoulli``), else in ``like``'s dtype (the
    BLoB reference's layout). ``x * signs`` promotes int8 to ``x``'s dtype exactly."""
    if compact:
        return torch.randint(0, 2, shape, device=like.device, dtype=torch.int8).mul_(2).sub_(1)
    return torch.empty(shape, device=like.device, dtype=like.dtype).bernoulli_(0.5).mul_(2).sub_(1)


class BlobLayer(BayesianLowRankLayer):
    """BLoB on one ``nn.Linear``: ``blob_A`` (r, n) the mean M of A, ``blob_A_g`` (r, n) with σ = G²,
    ``blob_B`` (m, r) deterministic."""

    adapter_layer_names = ("blob_A", "blob_B", "blob_A_g")
    variance_parameter_names = ("blob_A_g",)
    other_param_names = (*BayesianLowRankLayer.other_param_names, "prior_std", "flipout_signs")

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: BlobConfig, bayesian: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(base_layer, **kwargs)
        self.blob_A = nn.ParameterDict({})
        self.blob_B = nn.ParameterDict({})
        self.blob_A_g = nn.ParameterDict({})
        self.prior_std: dict[str, float] = {}
        self.flipout_signs: dict[str, str] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, bayesian=bayesian)

    def update_layer(self, adapter_name: str, config: BlobConfig, bayesian: bool = True, **kwargs: Any) -> None:
        """Create adapter ``adapter_name``: M Kaiming-uniform (LoRA's A), B = 0, G ~ U(ε/√2, ε) (``bayesian=False``:
        no G, A is its mean: LoRA)."""
        r = config.r
        self._register_common(adapter_name, r, config.lora_alpha, config.lora_dropout, bayesian)
        self.prior_std[adapter_name] = config.prior_std
        self.flipout_signs[adapter_name] = config.flipout_signs
        self.blob_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
        self.blob_B[adapter_name] = nn.Parameter(torch.zeros(self.out_features, r))
        nn.init.kaiming_uniform_(self.blob_A[adapter_name], a=math.sqrt(5))
        if bayesian:
            self.blob_A_g[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
            nn.init.uniform_(self.blob_A_g[adapter_name], config.init_eps / math.sqrt(2), config.init_eps)
        self._finish_update(adapter_name, config.inference_mode)

    def posterior_std(self, adapter: str) -> Tensor:
        """σ = G², the standard deviation of each entry of A (empty for a deterministic adapter)."""
        if adapter not in self.blob_A_g:
            return self.blob_A[adapter].new_zeros(0)
        return positive(self.blob_A_g[adapter], "square")

    def adapter_code(self, x: Tensor, adapter: str) -> tuple[Tensor, Tensor]:
        """``(A·x, B)`` with A the posterior mean, or a draw of A when the layer samples (flipout noise, or one A
        per sequence inside :func:`~bayeslora.sampling.frozen_samples`)."""
        mean, B = self.blob_A[adapter], self.blob_B[adapter]
        h = x @ mean.T  # (R, T, n) @ (n, r) -> (R, T, r)
        if self.samples(adapter):
            h = h + (self._sequence_noise(x, adapter) if frozen() else self._flipout_noise(x, adapter))
        return h, B  # (R, T, r), (m, r)

    def _flipout_noise(self, x: Tensor, adapter: str) -> Tensor:
        """((x ⊙ r_A)·Eᵀ) ⊙ s_A with one E per forward pass (per posterior copy when copies are announced)."""
        sigma = self.posterior_std(adapter)  # (r, n)
        r = sigma.shape[0]
        compact = self.flipout_signs.get(adapter, "int8") == "int8"
        signed = x * _random_signs(x.shape, x, compact)  # x ⊙ r_A, (R, T, n)
        copies = current_row_copies()
        rows = x.shape[0] if x.dim() > 1 else 1
        if copies is None or copies.shape[0] != rows:
            noise = sigma * torch.randn_like(sigma)  # E, (r, n)
            projected = signed @ noise.T  # (R, T, r)
        else:
            copies = copies.to(x.device)
            noise = sigma * torch.randn((int(copies.max()) + 1, *sigma.shape), device=x.device, dtype=sigma.dtype)
            per_row = signed.reshape(rows, -1, x.shape[-1])  # (R, T, n)
            projected = torch.bmm(per_row, noise[copies].transpose(1, 2)).reshape(*x.shape[:-1], r)  # (R, T, r)
        return projected * _random_signs(projected.shape, projected, compact)  # ⊙ s_A

    def _sequence_noise(self, x: Tensor, adapter: str) -> Tensor:
        """``x·E_eᵀ`` with one noise matrix E_e = σ ⊙ ε per sequence e, the same at every pass in the block."""
        sigma = self.posterior_std(adapter)  # (r, n)
        rows = x.shape[0] if x.dim() > 1 else 1
        examples = current_row_examples()
        if examples is None or examples.shape[0] != rows:
            examples = torch.arange(rows)
        examples = examples.to(x.device)
        noise = sigma * frozen_noise(self, f"{adapter}.A", (int(examples.max()) + 1, *sigma.shape), sigma)  # (E, r, n)
        per_row = x.reshape(rows, -1, x.shape[-1])  # (R, T, n)
        projected = torch.bmm(per_row, noise[examples].transpose(1, 2).to(x.dtype))  # (R, T, r)
        return projected.reshape(*x.shape[:-1], sigma.shape[0])

    def effective_factors(self, adapter: str) -> tuple[Tensor, Tensor]:
        """``(M, s·B)``: the mean of A."""
        return self.blob_A[adapter], self.scaling[adapter] * self.blob_B[adapter]

    def posterior_width(self, adapter: str) -> dict[str, float | None] | None:
        """s·B·(M + Σ ⊙ ε): the noise of A's entries reaches ΔW through B alone."""
        std = self.posterior_std(adapter)
        if std.numel() == 0:
            return None
        B = self.scaling[adapter] * self.blob_B[adapter]
        return gaussian_factor_width(B, self.blob_A[adapter], std, None, self.get_base_layer().weight)

    def kl(self, adapter: str) -> Tensor:
        if adapter not in self.blob_A_g:  # deterministic: no posterior, no KL
            return torch.zeros((), dtype=torch.float64, device=self.blob_A[adapter].device)
        return gaussian_kl(self.blob_A[adapter], self.posterior_std(adapter), 0.0, self.prior_std[adapter])
