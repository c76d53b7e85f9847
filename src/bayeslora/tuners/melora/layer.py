"""The Me-LoRA layer: y = W0 x + s·B·S·A·x, with one sample of the r×r core S per example.

Shapes in the comments: R rows (sequences), T tokens, n = in_features, m = out_features, E examples.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ...sampling import current_row_examples, use_posterior_mean
from ..base import BayesianLowRankLayer, gaussian_kl, inverse_positive, positive
from .config import MeLoraConfig


class MeLoraLayer(BayesianLowRankLayer):
    """Me-LoRA on one ``nn.Linear``.

    Parameters per adapter: ``melora_A`` (r, n) and ``melora_B`` (m, r), deterministic as in LoRA;
    ``melora_core`` M_S and ``melora_core_rho`` ρ with Σ_S = softplus(ρ) (or exp(ρ)), each (r, r) for a
    full core or (r,) for a diagonal one. The core sample S = M_S + Σ_S ⊙ ε is drawn once per example
    (see :mod:`bayeslora.sampling`), so all rows of an example share it and N posterior samples of a batch
    run as one pass over the batch tiled N times; that costs E·r² extra numbers.
    """

    adapter_layer_names = ("melora_A", "melora_B", "melora_core", "melora_core_rho")
    variance_parameter_names = ("melora_core_rho",)
    other_param_names = (*BayesianLowRankLayer.other_param_names, "core", "sigma_param", "prior_mean", "prior_std")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MeLoraConfig, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.melora_A = nn.ParameterDict({})
        self.melora_B = nn.ParameterDict({})
        self.melora_core = nn.ParameterDict({})
        self.melora_core_rho = nn.ParameterDict({})
        self.core: dict[str, str] = {}
        self.sigma_param: dict[str, str] = {}
        self.prior_mean: dict[str, str] = {}
        self.prior_std: dict[str, float] = {}
        self._active_adapter = adapter_name
        self._warned_rows = False
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: MeLoraConfig, **kwargs: Any) -> None:
        """Create (or re-create) adapter ``adapter_name`` with LoRA's initialisation for A and B
        (Kaiming-uniform A, zero B), M_S at the identity or a random orthogonal matrix, Σ_S = sigma_init."""
        r = config.r
        self._register_common(adapter_name, r, config.lora_alpha, config.lora_dropout)
        self.core[adapter_name] = config.core
        self.sigma_param[adapter_name] = config.sigma_param
        self.prior_mean[adapter_name] = config.prior_mean
        self.prior_std[adapter_name] = config.prior_std
        core_shape = (r, r) if config.core == "full" else (r,)
        self.melora_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
        self.melora_B[adapter_name] = nn.Parameter(torch.zeros(self.out_features, r))
        self.melora_core[adapter_name] = nn.Parameter(torch.empty(core_shape))
        self.melora_core_rho[adapter_name] = nn.Parameter(
            torch.full(core_shape, inverse_positive(config.sigma_init, config.sigma_param))
        )
        nn.init.kaiming_uniform_(self.melora_A[adapter_name], a=math.sqrt(5))
        with torch.no_grad():
            self.melora_core[adapter_name].copy_(self._initial_core(config, r))
        self._finish_update(adapter_name, config.inference_mode)

    @staticmethod
    def _initial_core(config: MeLoraConfig, r: int) -> Tensor:
        if config.core == "diag":
            if config.core_init == "identity":
                return torch.ones(r)
            return torch.randint(0, 2, (r,)).float() * 2 - 1  # random signs: a diagonal orthogonal matrix
        if config.core_init == "identity":
            return torch.eye(r)
        return torch.linalg.qr(torch.randn(r, r)).Q

    def posterior_std(self, adapter: str) -> Tensor:
        """Σ_S, the standard deviation of each core entry."""
        return positive(self.melora_core_rho[adapter], self.sigma_param[adapter])

    def prior_center(self, adapter: str) -> Tensor | float:
        """The prior mean of S: the identity (as a matrix, or ones for a diagonal core) or zero."""
        if self.prior_mean[adapter] == "zero":
            return 0.0
        core = self.melora_core[adapter]
        return torch.eye(core.shape[0], device=core.device) if core.dim() == 2 else torch.ones_like(core)

    def _rows_to_examples(self, rows: int, device: torch.device) -> Tensor:
        index = current_row_examples()
        if index is not None and index.shape[0] == rows:
            return index.to(device)
        if index is not None and not self._warned_rows:
            warnings.warn(
                f"Me-LoRA layer saw {rows} rows but the forward pass announced {index.shape[0]}: each row gets "
                f"its own core sample here.",
                stacklevel=3,
            )
            self._warned_rows = True
        return torch.arange(rows, device=device)

    def sample_cores(self, adapter: str, num_examples: int) -> Tensor:
        """``num_examples`` independent draws of S: (E, r, r) for a full core, (E, r) for a diagonal one."""
        mean = self.melora_core[adapter]
        noise = torch.randn((num_examples, *mean.shape), device=mean.device, dtype=mean.dtype)
        return mean + self.posterior_std(adapter) * noise

    def adapter_output(self, x: Tensor, adapter: str) -> Tensor:
        A, B, mean = self.melora_A[adapter], self.melora_B[adapter], self.melora_core[adapter]
        full = mean.dim() == 2
        h = x @ A.T  # (R, T, n) @ (n, r) -> (R, T, r)
        if use_posterior_mean():
            z = h @ mean.T if full else h * mean  # (R, T, r)
            return z @ B.T  # (R, T, r) @ (r, m) -> (R, T, m)
        rows = h.shape[0] if h.dim() > 1 else 1
        per_row = h.reshape(rows, -1, h.shape[-1])  # (R, T, r); a 2-D input is T = 1
        examples = self._rows_to_examples(rows, h.device)  # (R,)
        cores = self.sample_cores(adapter, int(examples.max()) + 1)[examples]  # (R, r, r) or (R, r)
        if full:
            z = torch.bmm(per_row, cores.transpose(1, 2))  # row b: h_bt S_bᵀ, (R, T, r)
        else:
            z = per_row * cores[:, None, :]  # (R, T, r)
        return z.reshape(h.shape) @ B.T  # (R, T, m)

    def get_delta_weight(self, adapter: str) -> Tensor:
        A, B, mean = self.melora_A[adapter], self.melora_B[adapter], self.melora_core[adapter]
        core = mean if mean.dim() == 2 else torch.diag(mean)
        return self.scaling[adapter] * (B @ core @ A)  # (m, r) (r, r) (r, n) -> (m, n)

    def kl(self, adapter: str) -> Tensor:
        return gaussian_kl(
            self.melora_core[adapter], self.posterior_std(adapter), self.prior_center(adapter), self.prior_std[adapter]
        )
