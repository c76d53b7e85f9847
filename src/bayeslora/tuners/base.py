"""What the Bayesian low-rank tuners share: config fields, the layer skeleton, the PEFT model class.

A layer adds ``s·Δ(x)`` to a frozen linear layer ``y = W0 x``, with ``s = lora_alpha / r`` and a
method-specific stochastic low-rank ``Δ``. Subclasses implement :meth:`BayesianLowRankLayer.update_layer`
(create the adapter's parameters), ``adapter_code`` (``Δ(x) = c(x)·Bᵀ`` as its r-dimensional code ``c(x)`` and
the up-projection ``B``, without the scaling, sampling when :func:`~bayeslora.sampling.should_sample`: in
training mode, or when asked for), ``effective_factors`` (the
posterior-mean ΔW as LoRA factors, used for merging and export) and ``kl`` (KL(q || p) of the adapter's
posterior to its prior).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import Tensor, nn

from .blocks import is_bayesian_module, parse_bayesian_layers, warn_if_every_block
from .costs import DEFAULT_BITS, AdapterStructure
from .sampling import should_sample

SigmaParam = Literal["softplus", "exp", "square"]
_MIN_STD = 1e-8  # σ never reaches 0, so log σ in the KL stays finite
_MAX_LOG_STD = 20.0  # exp(ρ) is computed on ρ ≤ 20: beyond, the KL's float32 gradient σ²/σ_p² overflows


def positive(raw: Tensor, kind: SigmaParam) -> Tensor:
    """A standard deviation from an unconstrained parameter: ``softplus(ρ)``, ``exp(ρ)`` or ``G²`` (BLoB),
    floored at 1e-8 and (for ``exp``) computed on ``ρ`` clamped at 20, so that it and its gradients stay finite."""
    if kind == "softplus":
        std = F.softplus(raw)
    elif kind == "exp":
        std = torch.exp(raw.clamp(max=_MAX_LOG_STD))
    elif kind == "square":
        std = raw.square()
    else:
        raise ValueError(f"unknown σ parameterisation '{kind}': softplus, exp or square")
    return std.clamp_min(_MIN_STD)


def inverse_positive(std: float, kind: SigmaParam) -> float:
    """The raw parameter value whose :func:`positive` is ``std``."""
    if std <= 0:
        raise ValueError(f"a standard deviation must be positive, got {std}")
    if kind == "softplus":
        return std + math.log(-math.expm1(-std))  # softplus⁻¹(σ) = log(e^σ − 1), stable form
    if kind == "exp":
        return math.log(std)
    if kind == "square":
        return math.sqrt(std)
    raise ValueError(f"unknown σ parameterisation '{kind}': softplus, exp or square")


#: The largest slice of a layer's output that :func:`add_low_rank_` materialises at once (bytes).
LOW_RANK_CHUNK_BYTES = 16 * 2**20


def add_low_rank_(result: Tensor, code: Tensor, B: Tensor, scale: float) -> Tensor:
    """``result += scale · code·Bᵀ`` in place, ``result`` (..., m), ``code`` (..., r), B (m, r), without
    materialising ``code·Bᵀ`` whole: rows go in slices of at most :data:`LOW_RANK_CHUNK_BYTES` (a wide layer, such
    as a language model's head of 49,152 outputs over the N posterior copies of a batch, would otherwise allocate
    and add a fresh output-sized float32 tensor per call; measured here, that costs seconds of page faults). The
    sum is rounded once to ``result``'s dtype. For evaluation without autograd (in-place on ``result``)."""
    rows = result.reshape(-1, result.shape[-1]) if result.is_contiguous() else None
    if rows is None:
        return result.add_(code @ B.T, alpha=scale)
    codes = code.reshape(-1, code.shape[-1])  # (R·T, r)
    step = max(1, LOW_RANK_CHUNK_BYTES // (B.shape[0] * B.element_size()))
    for start in range(0, codes.shape[0], step):
        rows[start : start + step].add_(F.linear(codes[start : start + step], B), alpha=scale)  # (rows, m)
    return result


def gaussian_kl(mean: Tensor, std: Tensor, prior_mean: Tensor | float, prior_std: float) -> Tensor:
    """KL(N(mean, std²) || N(prior_mean, prior_std²)) summed over all entries, in closed form:

    Σ [ log(σ_p / σ) + (σ² + (μ − μ_p)²) / (2 σ_p²) − ½ ]

    Accumulated in float64 (thousands of terms of similar size are summed).
    """
    mean, std = mean.double(), std.double()
    terms = math.log(prior_std) - std.log() + (std.square() + (mean - prior_mean).square()) / (2 * prior_std**2) - 0.5
    return terms.sum()


#: Molchanov et al. (2017, "Variational Dropout Sparsifies Deep Neural Networks", eq. 14): the fit of
#: −KL(N(θ, αθ²) || p(|w|) ∝ 1/|w|) ≈ k1·sigmoid(k2 + k3·log α) − ½·log(1 + 1/α) − k1, within 0.01 of the true value
#: (up to its additive constant, which makes the fit vanish as α → ∞) for every α.
LOG_UNIFORM_KL_FIT = (0.63576, 1.87320, 1.48695)

#: log α is clamped to this range in :func:`log_uniform_kl` (as in the paper's code): at the top the KL is 2e-5, at
#: the bottom σ is 0.7 % of |θ|; the clamp keeps an entry whose mean is exactly zero finite.
LOG_ALPHA_RANGE = (-10.0, 10.0)


def log_uniform_kl(mean: Tensor, std: Tensor) -> Tensor:
    """KL(N(θ, σ²) || log-uniform) summed over all entries, as fitted by Molchanov et al. (2017):

    Σ [ k1 − k1·sigmoid(k2 + k3·log α) + ½·log(1 + 1/α) ],  α = σ² / θ²

    The log-uniform prior p(|w|) ∝ 1/|w| is improper and scale-free: the KL depends on α = (σ/θ)² only, so it is
    unchanged when an entry's mean and standard deviation are scaled together (Me-LoRA's rescaling freedom, see
    :class:`~bayeslora.tuners.melora.config.MeLoraCoreOptions`). It decreases as α grows: the prior favours noise
    as wide as the likelihood allows, relative to each entry's own mean. Accumulated in float64.
    """
    k1, k2, k3 = LOG_UNIFORM_KL_FIT
    mean, std = mean.double(), std.double()
    log_alpha = (2 * std.clamp_min(1e-300).log() - torch.log(mean.square() + 1e-300)).clamp(*LOG_ALPHA_RANGE)
    terms = k1 - k1 * torch.sigmoid(k2 + k3 * log_alpha) + 0.5 * torch.log1p(torch.exp(-log_alpha))
    return terms.sum()


def gaussian_factor_width(
    left: Tensor, mean: Tensor, std: Tensor, right: Tensor | None, base_weight: Tensor
) -> dict[str, float | None]:
    """How wide a Gaussian weight update ΔW = L·(M + Σ ⊙ ε)·R is, ε_ij ~ N(0, 1), measured on ΔW itself (so that no
    reparametrisation of the factors changes it): L (m, p), M and Σ (p, q) (or (p,) for a diagonal), R (q, n) or
    None for the identity (q = n).

    * ``mean_norm`` ‖E ΔW‖_F = ‖L·M·R‖_F, from the p×p and q×q Gram matrices: tr((LᵀL)·M·(RRᵀ)·Mᵀ);
    * ``noise_norm`` √E‖ΔW − E ΔW‖²_F = √(Σ_ij σ_ij²·‖L_:i‖²·‖R_j:‖²);
    * ``noise_to_mean`` = noise_norm / mean_norm (None while the mean update is zero) and ``noise_to_base`` =
      noise_norm / ‖W0‖_F (``base_weight``; None for a quantized base, whose stored weight is packed codes);
    * ``sigma_mean`` the mean σ and ``sigma_to_mean`` the median over the entries of σ_ij / |M_ij|.

    Computed in float64 without autograd."""
    with torch.no_grad():
        left, mean, std = (t.detach().double() for t in (left, mean, std))
        ratio = float(torch.quantile((std / mean.abs()).flatten(), 0.5))
        if mean.dim() == 1:  # a diagonal: zero mean and no noise off it
            mean, std = torch.diag(mean), torch.diag(std)
        left_gram = left.T @ left  # (p, p)
        if right is None:
            mean_sq = torch.trace(left_gram @ mean @ mean.T)
            right_sq = torch.ones(mean.shape[1], dtype=mean.dtype, device=mean.device)
        else:
            right = right.detach().double()
            right_gram = right @ right.T  # (q, q)
            mean_sq = torch.trace(left_gram @ mean @ right_gram @ mean.T)
            right_sq = torch.diagonal(right_gram)
        noise_sq = (torch.diagonal(left_gram)[:, None] * std.square() * right_sq[None, :]).sum()
        mean_norm, noise_norm = float(mean_sq.clamp_min(0).sqrt()), float(noise_sq.sqrt())
        floating = base_weight.is_floating_point() and type(base_weight) in (torch.Tensor, nn.Parameter)
        base_norm = float(torch.linalg.vector_norm(base_weight.detach().double())) if floating else None
    return {
        "mean_norm": mean_norm,
        "noise_norm": noise_norm,
        "base_norm": base_norm,
        "noise_to_mean": noise_norm / mean_norm if mean_norm > 0 else None,
        "noise_to_base": noise_norm / base_norm if base_norm else None,
        "sigma_mean": float(std[std > 0].mean()) if bool((std > 0).any()) else 0.0,
        "sigma_to_mean": ratio,
    }


@dataclass
class LowRankBayesConfig(PeftConfig):
    """Fields every Bayesian low-rank tuner shares (the same meaning as in PEFT's ``LoraConfig``)."""

    r: int = field(default=8, metadata={"help": "Rank r of the low-rank update."})
    lora_alpha: float = field(default=16.0, metadata={"help": "Scaling numerator: ΔW is scaled by lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input during training."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names (or a regex) of the linear layers to adapt."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never to adapt."})
    target_parameters: list[str] | None = field(default=None, metadata={"help": "Unsupported; must stay None."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Only these layer indices."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    bias: str = field(default="none", metadata={"help": "Only 'none' is supported."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained and saved (a classifier head, for instance)."}
    )
    bayesian_layers: str = field(
        default="all",
        metadata={
            "help": "Which adapted layers carry the posterior: all, or last:K (the top K blocks and the head; the "
            "adapters below are deterministic, and N posterior samples share one pass through them)."
        },
    )

    #: subclasses set the PEFT method name
    method_name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        from ._peft_compat import ensure_peft_type

        super().__post_init__()
        self.peft_type = ensure_peft_type(self.method_name)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        for option in dataclasses.fields(self):  # every option declared with its choices (core, bit-widths, ...)
            allowed = option.metadata.get("choices")
            if allowed is not None and getattr(self, option.name) not in allowed:
                raise ValueError(
                    f"{type(self).__name__}.{option.name} must be one of {', '.join(map(str, allowed))}, "
                    f"got {getattr(self, option.name)!r}"
                )
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        # Unsupported options raise TypeError, as PEFT's tuners do for options they do not have (PEFT's own test
        # suites skip a method on TypeError). The fields stay, so that saved adapter configs keep their keys.
        if self.bias != "none":
            raise TypeError(
                f"bias='{self.bias}' is not supported by {self.method_name}: its layers have no bias of "
                f"their own; use bias='none' (the base layer's bias stays frozen)"
            )
        if self.target_parameters:
            raise TypeError(f"{self.method_name} adapts linear modules only; target_parameters must be None")
        parse_bayesian_layers(self.bayesian_layers)


class BayesianLowRankLayer(nn.Module, BaseTunerLayer):
    """A frozen linear layer plus a Bayesian low-rank adapter per adapter name."""

    #: names of the ParameterDicts holding the variance parameters (for their own learning rate)
    variance_parameter_names: ClassVar[tuple[str, ...]] = ()
    other_param_names = ("r", "lora_alpha", "scaling", "adapter_dropout", "stochastic")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.stochastic: dict[str, bool] = {}  # False: a deterministic adapter (below bayesian_layers' blocks)
        self.adapter_dropout = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"{type(self).__name__} adapts torch.nn.Linear layers only, got {type(base).__name__}; "
                f"choose linear target modules."
            )
        self.in_features, self.out_features = base.in_features, base.out_features

    # --- to implement ---
    def adapter_code(self, x: Tensor, adapter: str) -> tuple[Tensor, Tensor]:
        """``(c, B)`` with ``Δ(x) = c·Bᵀ`` for one adapter (before the ``lora_alpha / r`` scaling): the code ``c``
        ``(..., r)``, with any posterior sample already drawn, and the up-projection ``B`` ``(out_features, r)``."""
        raise NotImplementedError

    def adapter_output(self, x: Tensor, adapter: str) -> Tensor:
        """``Δ(x)`` of one adapter (before the ``lora_alpha / r`` scaling), ``(..., out_features)``."""
        code, B = self.adapter_code(x, adapter)
        return code @ B.T  # (R, T, r) @ (r, m) -> (R, T, m)

    def kl(self, adapter: str) -> Tensor:
        """KL(q || p) of the adapter's posterior to its prior (a float64 scalar)."""
        raise NotImplementedError

    def effective_factors(self, adapter: str) -> tuple[Tensor, Tensor]:
        """``(A', B')``, A' (r', n) and B' (m, r'), with ``B'·A'`` the deterministic weight update s·E[ΔW]
        (the scaling folded into B'): what merging and the plain-LoRA export use."""
        raise NotImplementedError

    def get_delta_weight(self, adapter: str) -> Tensor:
        """The posterior-mean weight update ``s·E[ΔW]``, ``(out_features, in_features)``."""
        A, B = self.effective_factors(adapter)
        return B @ A  # (m, r') (r', n) -> (m, n)

    def posterior_std(self, adapter: str) -> Tensor:
        """The standard deviation of every random entry of the adapter (Me-LoRA: the core; BLoB: A)."""
        raise NotImplementedError

    def posterior_width(self, adapter: str) -> dict[str, float | None] | None:
        """How wide the adapter's posterior over s·ΔW is (:func:`gaussian_factor_width`), None for a deterministic
        adapter."""
        return None

    def adapter_structure(self, adapter: str) -> AdapterStructure:
        """What the adapter's bit operations depend on (:mod:`bayeslora.tuners.costs`): here its full rank at 16
        bits, with the layer's core (Me-LoRA's ``full`` or ``diag``) if it has one."""
        core = getattr(self, "core", {}).get(adapter)
        return AdapterStructure(self.r[adapter], {"A": DEFAULT_BITS, "B": DEFAULT_BITS}, core=core)

    # --- shared ---
    def _register_common(
        self, adapter_name: str, r: int, lora_alpha: float, dropout: float, bayesian: bool = True
    ) -> None:
        if r <= 0:
            raise ValueError(f"r must be a positive integer, got {r}")
        self.stochastic[adapter_name] = bayesian
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.adapter_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_dropout[adapter_name].train(self.training)  # an adapter added in evaluation mode evaluates

    def _finish_update(self, adapter_name: str, inference_mode: bool) -> None:
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def samples(self, adapter: str) -> bool:
        """Whether the adapter draws its weights in the forward pass in progress: a Bayesian (not deterministic)
        adapter, in training mode or when sampling is asked for (:func:`~bayeslora.sampling.should_sample`)."""
        return self.stochastic.get(adapter, True) and should_sample(self.training)

    def _has(self, adapter: str) -> bool:
        return adapter in getattr(self, self.adapter_layer_names[0])

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        x = self.layer_input(x)
        result = self.base_output(x, *args, **kwargs)
        for adapter in self.active_adapters:
            if not self._has(adapter):
                continue
            first = getattr(self, self.adapter_layer_names[0])[adapter]
            inputs = self._cast_input_dtype(x, first.dtype)
            code, B = self.adapter_code(self.adapter_dropout[adapter](inputs), adapter)
            if torch.is_grad_enabled():
                result = result + ((code @ B.T) * self.scaling[adapter]).to(result.dtype)  # (R, T, m)
            else:
                add_low_rank_(result, code, B, self.scaling[adapter])
        return result

    def layer_input(self, x: Tensor) -> Tensor:
        """The input both the frozen path and the adapters see, computed once per forward pass (B-LoRA may
        quantize it)."""
        return x

    def base_output(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """The frozen layer's output ``W0 x`` (B-LoRA may quantize W0)."""
        return self.base_layer(x, *args, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the posterior-mean update of the active adapters to the base weight."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if not self._has(adapter):
                continue
            weight = self.get_base_layer().weight
            if not weight.is_floating_point():
                raise ValueError(
                    f"Cannot merge into a quantized base weight ({weight.dtype}, e.g. loaded in 4 or 8 bits): "
                    f"merge on the float base model, or keep the adapter unmerged."
                )
            delta = self.get_delta_weight(adapter).detach().to(weight.dtype)
            if safe_merge and not torch.isfinite(weight.data + delta).all():
                raise ValueError(f"NaNs detected in the merged weights; adapter {adapter} seems broken")
            weight.data += delta
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract merged updates from the base weight."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            weight = self.get_base_layer().weight
            weight.data -= self.get_delta_weight(adapter).detach().to(weight.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__.lower()}." + super().__repr__()


class BayesianLowRankModel(BaseTuner):
    """The PEFT model class of a Bayesian low-rank tuner: wraps each target ``nn.Linear`` in ``layer_cls``."""

    layer_cls: ClassVar[type[BayesianLowRankLayer]]  # subclasses also set tuner_layer_cls = layer_cls
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        bayesian = is_bayesian_module(current_key, self.model, config.bayesian_layers)
        if isinstance(target, self.layer_cls):
            target.update_layer(adapter_name, config, bayesian=bayesian)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"Target module {current_key} is a {type(base).__name__}; {config.method_name} adapts "
                f"torch.nn.Linear layers only."
            )
        new_module = self.layer_cls(target, adapter_name, config, bayesian=bayesian)
        new_module.train(target.training)  # a layer added to a model in evaluation mode evaluates too
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until activated
        self._replace_module(parent, target_name, new_module, target)

    #: training forward passes after which an adapter whose objective was never computed is warned about
    UNREGULARISED_PASSES: ClassVar[int] = 2

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for config in self.peft_config.values():
            if not config.inference_mode:  # when the adapter is made to be trained, not each time it is loaded
                warn_if_every_block(self.model, config.bayesian_layers)
        self._regularised = False
        self._unregularised_passes = 0
        # on the wrapped model, which every PeftModel class calls (PeftModel.forward bypasses the tuner's forward)
        self._pass_hook = self.model.register_forward_pre_hook(self._note_training_pass)

    def mark_regularised(self) -> None:
        """Record that training adds this adapter's own terms (its KL, a gate penalty) to the loss: called by
        :meth:`kl` and by the trainers that add them, so that no warning is given."""
        self._regularised = True
        self._pass_hook.remove()

    def _note_training_pass(self, module: nn.Module, args: Any) -> None:
        """Warn once when the adapter is trained without its own terms: a plain ``transformers.Trainer`` or TRL
        trainer trains the posterior's mean and leaves its variance and gates without the prior's pull."""
        if self._regularised or not (module.training and torch.is_grad_enabled()):
            return
        self._unregularised_passes += 1
        if self._unregularised_passes < self.UNREGULARISED_PASSES:
            return
        self._pass_hook.remove()
        if not any(p.requires_grad for layer in self.bayesian_layers() for p in layer.parameters()):
            return  # nothing of the adapter trains (or it was unloaded)
        name = type(next(iter(self.peft_config.values()))).__name__ if self.peft_config else "Bayesian"
        warnings.warn(
            f"The {name} adapter is being trained without its own loss terms (the KL of its posterior, or B-LoRA's "
            f"gate penalty): the trainer's loss omits them, so its variance and gates learn from the data alone. "
            f"Train with bayeslora.BayesianTrainer or bayeslora.bayesian_trainer(YourTrainer) (e.g. trl.SFTTrainer), "
            f"or add bayeslora.model_kl(model) / n_train to your loss yourself.",
            UserWarning,
            stacklevel=3,
        )

    def bayesian_layers(self) -> list[BayesianLowRankLayer]:
        """Every adapter layer of this model."""
        return [m for m in self.model.modules() if isinstance(m, self.layer_cls)]

    def kl(self) -> Tensor:
        """KL(q || p) summed over the active adapters of every layer (a float64 scalar)."""
        self.mark_regularised()
        terms = [
            layer.kl(adapter)
            for layer in self.bayesian_layers()
            for adapter in layer.active_adapters
            if layer._has(adapter)
        ]
        return torch.stack(terms).sum() if terms else torch.zeros((), dtype=torch.float64)
