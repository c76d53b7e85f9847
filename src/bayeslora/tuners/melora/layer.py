"""The Me-LoRA layer: y = W0 x + s·B·S·A·x, with one sample of the r×r core S per example.

Shapes in the comments: R rows (sequences), T tokens, n = in_features, m = out_features, E examples.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..base import (
    BayesianLowRankLayer,
    gaussian_factor_width,
    gaussian_kl,
    inverse_positive,
    log_uniform_kl,
    positive,
)
from ..sampling import current_row_examples, frozen_noise
from .config import MeLoraConfig, MeLoraCoreOptions

#: A factor's rows (columns) shorter than this are not normalised further (a zero row stays zero).
_MIN_NORM = 1e-12


class SampledCoreMixin:
    """A Gaussian core S = M_S + Σ_S ⊙ ε between the two low-rank factors, drawn once per example.

    M_S and ρ (Σ_S = softplus(ρ) or exp(ρ)) are (r, r) for a full core or (r,) for a diagonal one, stored
    in the ParameterDicts named by :attr:`core_mean_name` and :attr:`core_rho_name`. All rows of an example
    share its sample (see :mod:`bayeslora.sampling`), so N posterior samples of a batch run as one pass
    over the batch tiled N times, at a cost of E·r² extra numbers. Used by Me-LoRA and by B-LoRA's
    Bayesian core.
    """

    core_mean_name: ClassVar[str]
    core_rho_name: ClassVar[str]

    def _init_core_options(self) -> None:
        self.core: dict[str, str] = {}
        self.sigma_param: dict[str, str] = {}
        self.prior_mean: dict[str, str] = {}
        self.prior_std: dict[str, float] = {}
        self.factor_norm: dict[str, str] = {}
        self.core_prior: dict[str, str] = {}
        self._warned_rows = False

    def _create_core(self, adapter_name: str, config: MeLoraCoreOptions, r: int) -> None:
        """M_S at zero (``factor_norm="unit"``) or at the identity (or a random orthogonal matrix), Σ_S =
        sigma_init everywhere (no Σ_S for a deterministic adapter: call after ``_register_common``)."""
        self.core[adapter_name] = config.core
        self.sigma_param[adapter_name] = config.sigma_param
        self.prior_mean[adapter_name] = config.prior_mean
        self.prior_std[adapter_name] = config.prior_std
        self.factor_norm[adapter_name] = config.factor_norm
        self.core_prior[adapter_name] = config.core_prior
        shape = (r, r) if config.core == "full" else (r,)
        if config.factor_norm == "unit":
            mean = nn.Parameter(torch.zeros(shape))
        else:
            mean = nn.Parameter(initial_core(config.core, config.core_init, r))
        getattr(self, self.core_mean_name)[adapter_name] = mean
        if self.stochastic.get(adapter_name, True):  # a deterministic core has its mean only
            rho = nn.Parameter(torch.full(shape, inverse_positive(config.sigma_init, config.sigma_param)))
            getattr(self, self.core_rho_name)[adapter_name] = rho

    def initial_b(self, adapter_name: str, config: MeLoraCoreOptions, out_features: int, r: int) -> nn.Parameter:
        """B at the start: zero with free factors (LoRA's initialisation), random unit directions with unit
        factors (M_S = 0 then makes ΔW zero)."""
        if config.factor_norm != "unit":
            return nn.Parameter(torch.zeros(out_features, r))
        # columns of length about 1: only B's directions act, and Adam's steps of about lr per entry then turn a
        # column by about lr·√m, as they move a zero-initialised LoRA B (a long column would barely turn)
        return nn.Parameter(torch.randn(out_features, r) / math.sqrt(out_features))

    def scaled_factors(self, A: Tensor, B: Tensor, adapter: str) -> tuple[Tensor, Tensor]:
        """``(Â, B̂)``: A's rows and B's columns divided by their lengths with unit factors, else ``(A, B)``.
        A (r, n), B (m, r)."""
        if self.factor_norm.get(adapter, "free") != "unit":
            return A, B
        return A / A.norm(dim=1, keepdim=True).clamp_min(_MIN_NORM), B / B.norm(dim=0, keepdim=True).clamp_min(
            _MIN_NORM
        )

    def core_mean(self, adapter: str) -> Tensor:
        """M_S, (r, r) or (r,)."""
        return getattr(self, self.core_mean_name)[adapter]

    def posterior_std(self, adapter: str) -> Tensor:
        """Σ_S, the standard deviation of each core entry (empty for a deterministic core)."""
        rho = getattr(self, self.core_rho_name)
        if adapter not in rho:
            return self.core_mean(adapter).new_zeros(0)
        return positive(rho[adapter], self.sigma_param[adapter])

    def prior_center(self, adapter: str) -> Tensor | float:
        """The prior mean of S: the identity (as a matrix, or ones for a diagonal core) or zero."""
        if self.prior_mean[adapter] == "zero":
            return 0.0
        core = self.core_mean(adapter)
        return torch.eye(core.shape[0], device=core.device) if core.dim() == 2 else torch.ones_like(core)

    def _rows_to_examples(self, rows: int, device: torch.device) -> Tensor:
        index = current_row_examples()
        if index is not None and index.shape[0] == rows:
            return index.to(device)
        if index is not None and not self._warned_rows:
            warnings.warn(
                f"{type(self).__name__} saw {rows} rows but the forward pass announced {index.shape[0]}: each "
                f"row gets its own core sample here.",
                stacklevel=4,
            )
            self._warned_rows = True
        return torch.arange(rows, device=device)

    def sample_cores(self, adapter: str, num_examples: int) -> Tensor:
        """``num_examples`` independent draws of S: (E, r, r) for a full core, (E, r) for a diagonal one (the
        same draws at every pass inside :func:`~bayeslora.sampling.frozen_samples`)."""
        mean = self.core_mean(adapter)
        noise = frozen_noise(self, f"{adapter}.core", (num_examples, *mean.shape), mean)
        return mean + self.posterior_std(adapter) * noise

    def core_product(self, h: Tensor, adapter: str) -> Tensor:
        """``h Sᵀ`` row by row, ``(R, T, r) -> (R, T, r)``: with each example's own sample of S when the layer
        samples (training, or :func:`~bayeslora.sampling.sampling`), else with the posterior mean M_S."""
        mean = self.core_mean(adapter)
        full = mean.dim() == 2
        if not self.samples(adapter):
            return h @ mean.T if full else h * mean  # (R, T, r)
        rows = h.shape[0] if h.dim() > 1 else 1
        per_row = h.reshape(rows, -1, h.shape[-1])  # (R, T, r); a 2-D input is T = 1
        examples = self._rows_to_examples(rows, h.device)  # (R,)
        cores = self.sample_cores(adapter, int(examples.max()) + 1)[examples]  # (R, r, r) or (R, r)
        if full:
            z = torch.bmm(per_row, cores.transpose(1, 2))  # row b: h_bt S_bᵀ, (R, T, r)
        else:
            z = per_row * cores[:, None, :]  # (R, T, r)
        return z.reshape(h.shape)

    def mean_core_matrix(self, adapter: str) -> Tensor:
        """M_S as an (r, r) matrix (a diagonal core expanded)."""
        mean = self.core_mean(adapter)
        return mean if mean.dim() == 2 else torch.diag(mean)

    def core_kl(self, adapter: str) -> Tensor:
        """KL(q(S) || p(S)) summed over the core's entries (float64); 0 for a deterministic core."""
        if not self.stochastic.get(adapter, True):
            return torch.zeros((), dtype=torch.float64, device=self.core_mean(adapter).device)
        if self.core_prior.get(adapter, "gaussian") == "log-uniform":
            return log_uniform_kl(self.core_mean(adapter), self.posterior_std(adapter))
        return gaussian_kl(
            self.core_mean(adapter), self.posterior_std(adapter), self.prior_center(adapter), self.prior_std[adapter]
        )


def initial_core(core: str, core_init: str, r: int) -> Tensor:
    """The initial M_S: the identity or a random orthogonal matrix ((r,) ones or random signs if diagonal)."""
    if core == "diag":
        if core_init == "identity":
            return torch.ones(r)
        return torch.randint(0, 2, (r,)).float() * 2 - 1  # random signs: a diagonal orthogonal matrix
    if core_init == "identity":
        return torch.eye(r)
    return torch.linalg.qr(torch.randn(r, r)).Q


class MeLoraLayer(SampledCoreMixin, BayesianLowRankLayer):
    """Me-LoRA on one ``nn.Linear``.

    Parameters per adapter: ``melora_A`` (r, n) and ``melora_B`` (m, r), deterministic as in LoRA;
    ``melora_core`` M_S and ``melora_core_rho`` ρ of the core (see :class:`SampledCoreMixin`).
    """

    adapter_layer_names = ("melora_A", "melora_B", "melora_core", "melora_core_rho")
    variance_parameter_names = ("melora_core_rho",)
    other_param_names = (
        *BayesianLowRankLayer.other_param_names,
        "core",
        "sigma_param",
        "prior_mean",
        "prior_std",
        "factor_norm",
        "core_prior",
    )
    core_mean_name = "melora_core"
    core_rho_name = "melora_core_rho"

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: MeLoraConfig, bayesian: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(base_layer, **kwargs)
        self.melora_A = nn.ParameterDict({})
        self.melora_B = nn.ParameterDict({})
        self.melora_core = nn.ParameterDict({})
        self.melora_core_rho = nn.ParameterDict({})
        self._init_core_options()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, bayesian=bayesian)

    def update_layer(self, adapter_name: str, config: MeLoraConfig, bayesian: bool = True, **kwargs: Any) -> None:
        """Create (or re-create) adapter ``adapter_name``: Kaiming-uniform A; with unit factors random B and M_S = 0,
        with free factors LoRA's zero B and M_S at the identity or a random orthogonal matrix; Σ_S = sigma_init
        (``bayesian=False``: no Σ_S, the core is its mean)."""
        r = config.r
        self._register_common(adapter_name, r, config.lora_alpha, config.lora_dropout, bayesian)
        self.melora_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
        self.melora_B[adapter_name] = self.initial_b(adapter_name, config, self.out_features, r)
        nn.init.kaiming_uniform_(self.melora_A[adapter_name], a=math.sqrt(5))
        self._create_core(adapter_name, config, r)
        self._finish_update(adapter_name, config.inference_mode)

    def adapter_code(self, x: Tensor, adapter: str) -> tuple[Tensor, Tensor]:
        """``(S·Â·x, B̂)``: Δ(x) = B̂·S·Â·x."""
        A, B = self.scaled_factors(self.melora_A[adapter], self.melora_B[adapter], adapter)
        h = x @ A.T  # (R, T, n) @ (n, r) -> (R, T, r)
        return self.core_product(h, adapter), B  # (R, T, r), (m, r)

    def effective_factors(self, adapter: str) -> tuple[Tensor, Tensor]:
        """``(Â, s·B̂·M_S)`` (A and B as they are with free factors)."""
        A, B = self.scaled_factors(self.melora_A[adapter], self.melora_B[adapter], adapter)
        return A, self.scaling[adapter] * (B @ self.mean_core_matrix(adapter))

    def kl(self, adapter: str) -> Tensor:
        return self.core_kl(adapter)

    def posterior_width(self, adapter: str) -> dict[str, float | None] | None:
        """s·B̂·S·Â, with the factors as the forward pass uses them."""
        std = self.posterior_std(adapter)
        if std.numel() == 0:
            return None
        A, B = self.scaled_factors(self.melora_A[adapter], self.melora_B[adapter], adapter)
        scaled = self.scaling[adapter] * B
        return gaussian_factor_width(scaled, self.core_mean(adapter), std, A, self.get_base_layer().weight)
