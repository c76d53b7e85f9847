"""Laplace-LoRA: a post-hoc Kronecker-factored Laplace approximation over the LoRA weights of a trained run.

After training, the posterior over the LoRA matrices θ (every ``lora_A``/``lora_B`` of the chosen layers) is
approximated by N(θ*, (F + λI)⁻¹), with F the Fisher of the training log-likelihood in the K-FAC form of each
linear map W (out × in) of the adapter (Yang et al., ICLR 2024; Ritter et al., 2018):

    F_W ≈ Ā ⊗ G,   Ā = (1/M) Σ_tokens a aᵀ  (in × in),   G = Σ_tokens δ δᵀ  (out × out),

where a is W's input and δ the gradient of log p(y | x) with respect to its output, y sampled from the
model's own predictive (the Fisher, not the empirical Fisher), tokens counted as in K-FAC-expand (only the
tokens that influence the loss, M of them). An output factor wider than ``max_dense`` (the LM head's
49,152-wide B) is kept diagonal. With the eigen-decompositions Ā = U_A diag(α) U_Aᵀ, G = U_G diag(γ) U_Gᵀ,
the posterior covariance of vec W is (U_A ⊗ U_G) diag(1 / (α_j γ_i + λ)) (U_A ⊗ U_G)ᵀ, so

* a weight sample is ``W* + U_G (E ⊙ D^{-1/2}) U_Aᵀ`` with E ~ N(0, 1) and D_ij = γ_i α_j + λ;
* the linearised ("glm") predictive of the class scores f is N(f(θ*), J Σ Jᵀ), with, per example and per
  pair of classes, ``(J Σ Jᵀ)_cc' = Σ_W Σ_ij P_c,ij P_c',ij / D_ij``, P_c = U_Gᵀ (∂f_c/∂W) U_A, and the class
  probabilities are the mean softmax of Monte Carlo draws of f;
* the prior precision λ maximises the Laplace marginal likelihood
  ``−½ λ ‖θ*‖² + (P/2) log λ − ½ Σ_W Σ_ij log D_ij`` (the data term does not depend on λ), or minimises
  the NLL of held-out training examples.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ...evaluation.linearized import GAUSSIAN_DRAWS, gaussian_softmax
from ...evaluation.predictive import iterate_batches, model_device, move_batch
from ...evaluation.scoring import Batch, Scorer
from ...io import atomic_path
from ...tasks import HELDOUT_EXAMPLES
from ...tuners.sampling import current_row_examples

SUBSETS = ("all", "last")
PRIORS = ("auto", "marglik", "heldout")
#: ``auto`` chooses the prior on held-out training examples when at least this many are left unused.
MIN_HELDOUT = 50
PREDICTIVES = ("glm", "nn")
#: Output factors wider than this are kept diagonal (dense would be out² numbers).
MAX_DENSE = 4096


def resolve_prior(requested: str, split_size: int, train_size: int | None) -> str:
    """The prior-precision rule a run uses: ``requested`` unless it is ``auto``, which means ``heldout``
    when the run left at least :data:`MIN_HELDOUT` of the ``split_size`` training examples unused
    (``train_size`` below it) and ``marglik`` otherwise, with a warning: on language models the marginal
    likelihood's λ can leave the linearised predictive close to uniform (README, Calibration benchmark)."""
    if requested not in PRIORS:
        raise ValueError(f"the Laplace prior must be one of {', '.join(PRIORS)}, got '{requested}'")
    unused = split_size - train_size if train_size is not None else 0
    if requested == "heldout" and unused <= 0:
        raise ValueError(
            f"--laplace-prior heldout chooses the prior precision on training examples the run did not train on, "
            f"and it trains on all {split_size}: train with --train-size below {split_size} (leaving "
            f"{HELDOUT_EXAMPLES} or more unused is best), or use --laplace-prior marglik."
        )
    if requested != "auto":
        return requested
    if unused >= MIN_HELDOUT:
        return "heldout"
    warnings.warn(
        f"Laplace prior 'auto': only {max(unused, 0)} of the {split_size} training examples are left unused "
        f"(fewer than {MIN_HELDOUT}), so the prior precision is chosen by the marginal likelihood, which can "
        f"leave a language model's predictive close to uniform. Train with a smaller --train-size to keep "
        f"held-out examples, or set --laplace-prior marglik to choose this explicitly.",
        stacklevel=2,
    )
    return "marglik"


@dataclass
class KronFactor:
    """The K-FAC posterior factors of one LoRA linear map W (out × in).

    Attributes:
        name: the qualified name of the ``nn.Linear`` holding W in the PEFT model.
        input_values, input_vectors: eigen-decomposition of Ā, (in,), (in, in).
        output_values: eigenvalues of G, (out,); ``output_vectors`` (out, out), or None when G is diagonal
            (its eigenvectors are then the identity).
    """

    name: str
    input_values: Tensor
    input_vectors: Tensor
    output_values: Tensor
    output_vectors: Tensor | None

    def eigen_grid(self, prior_precision: float) -> Tensor:
        """D = γ αᵀ + λ, (out, in): the posterior precision of W in the eigenbasis."""
        return self.output_values[:, None] * self.input_values[None, :] + prior_precision

    def to_eigenbasis(self, matrix: Tensor) -> Tensor:
        """U_Gᵀ M U_A for M (..., out, in)."""
        projected = matrix @ self.input_vectors
        return projected if self.output_vectors is None else self.output_vectors.T @ projected

    def from_eigenbasis(self, matrix: Tensor) -> Tensor:
        """U_G M U_Aᵀ for M (out, in)."""
        back = matrix @ self.input_vectors.T
        return back if self.output_vectors is None else self.output_vectors @ back


def lora_linears(model: nn.Module, subset: str = "all") -> dict[str, nn.Linear]:
    """The ``lora_A`` / ``lora_B`` linear maps of the active LoRA adapter, by qualified name: all of them, or
    those of the adapted module closest to the output (``last``: the LM head if it is adapted)."""
    from peft.tuners.lora import LoraLayer

    if subset not in SUBSETS:
        raise ValueError(f"laplace subset must be one of {', '.join(SUBSETS)}, got '{subset}'")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError("Laplace-LoRA needs a LoRA adapter (a run of --method laplace or lora)")
    if subset == "last":
        layers = layers[-1:]
    found = {}
    for name, layer in layers:
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                found[f"{name}.lora_A.{adapter}"] = layer.lora_A[adapter]
                found[f"{name}.lora_B.{adapter}"] = layer.lora_B[adapter]
    return found


class _Recorder:
    """Forward and backward hooks that keep, per LoRA linear, its input a (R, T, in), the example of each of its
    rows (the row map announced to its pass, or None: the batch's sequence rows) and the gradient δ of the
    backpropagated quantity with respect to its output (R, T, out)."""

    def __init__(self, linears: dict[str, nn.Linear]) -> None:
        self.inputs: dict[str, Tensor] = {}
        self.row_examples: dict[str, Tensor | None] = {}
        self.grads: dict[str, Tensor] = {}
        self.handles = []
        for name, module in linears.items():
            self.handles.append(module.register_forward_hook(self._keep_input(name)))
            self.handles.append(module.register_full_backward_hook(self._keep_grad(name)))

    def _keep_input(self, name: str):
        def hook(module, args, output):
            self.inputs[name] = args[0].detach()
            self.row_examples[name] = current_row_examples()  # the LM head of a cloze pass: one row per target

        return hook

    def _keep_grad(self, name: str):
        def hook(module, grad_input, grad_output):
            self.grads[name] = grad_output[0].detach()

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextmanager
def _recording(linears: dict[str, nn.Linear]) -> Iterator[_Recorder]:
    recorder = _Recorder(linears)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            yield recorder
    finally:
        recorder.close()


@contextmanager
def _differentiable(linears: dict[str, nn.Linear]) -> Iterator[None]:
    """Within the block the LoRA weights require gradients (a loaded adapter's do not), and gradients are on."""
    states = [m.weight.requires_grad for m in linears.values()]
    try:
        for module in linears.values():
            module.weight.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for module, state in zip(linears.values(), states, strict=True):
            module.weight.requires_grad_(state)
            module.weight.grad = None


def _tokens(tensor: Tensor) -> Tensor:
    """(R, T, d) or (R, d) -> (R·T, d)."""
    return tensor.reshape(-1, tensor.shape[-1])


class KronLaplace:
    """A K-FAC Laplace posterior over a LoRA model's adapter weights (see the module docstring).

    Used as::

        laplace = KronLaplace.fit(model, scorer, train_examples)       # curvature at the trained weights
        laplace.optimize_prior_precision()                             # marginal likelihood
        probs, per_sample = laplace.predict_batch(model, scorer, batch, "glm", n_samples=10)
    """

    def __init__(self, factors: list[KronFactor], prior_precision: float = 1.0, subset: str = "all") -> None:
        self.factors = factors
        self.prior_precision = prior_precision
        self.subset = subset
        self._theta_norm: float | None = None

    # --- fitting ---
    @classmethod
    @torch.no_grad()
    def fit(
        cls,
        model: nn.Module,
        scorer: Scorer,
        examples: Sequence,
        *,
        subset: str = "all",
        batch_size: int = 8,
        max_dense: int = MAX_DENSE,
        seed: int = 0,
    ) -> KronLaplace:
        """The K-FAC factors of ``model``'s LoRA weights on ``examples``, labels drawn from the model."""
        linears = lora_linears(model, subset)
        device = model_device(model)
        dims = {name: (m.in_features, m.out_features) for name, m in linears.items()}
        a_sum = {n: torch.zeros(i, i, dtype=torch.float64, device=device) for n, (i, _) in dims.items()}
        g_sum = {
            n: torch.zeros(o, o, dtype=torch.float64, device=device)
            if o <= max_dense
            else torch.zeros(o, dtype=torch.float64, device=device)
            for n, (_, o) in dims.items()
        }
        tokens = dict.fromkeys(dims, 0)
        generator = torch.Generator().manual_seed(seed)
        was_training = model.training
        model.eval()
        try:
            with _recording(linears) as recorder:
                for indices in iterate_batches(examples, batch_size):
                    batch = move_batch(scorer.collate([examples[i] for i in indices]), device)
                    with _differentiable(linears):
                        logits = scorer.class_logits(model, batch)  # (B, C)
                        sampled = torch.multinomial(logits.detach().float().softmax(-1).cpu(), 1, generator=generator)
                        log_likelihood = logits.log_softmax(-1).gather(-1, sampled.to(device)).sum()
                        log_likelihood.backward()
                    for name in linears:
                        a, delta = _tokens(recorder.inputs[name]).double(), _tokens(recorder.grads[name]).double()
                        used = delta.abs().sum(-1) > 0  # tokens that influence the loss
                        a = a[used]
                        a_sum[name] += a.T @ a
                        tokens[name] += int(used.sum())
                        g_sum[name] += delta.T @ delta if g_sum[name].dim() == 2 else delta.square().sum(0)
        finally:
            model.train(was_training)
        factors = []
        for name in linears:
            input_values, input_vectors = torch.linalg.eigh(a_sum[name] / max(tokens[name], 1))
            if g_sum[name].dim() == 2:
                output_values, output_vectors = torch.linalg.eigh(g_sum[name])
            else:
                output_values, output_vectors = g_sum[name], None
            factors.append(
                KronFactor(name, input_values.clamp_min(0), input_vectors, output_values.clamp_min(0), output_vectors)
            )
        laplace = cls(factors, subset=subset)
        laplace._theta_norm = laplace._squared_norm(model)
        return laplace

    def _weights(self, model: nn.Module) -> dict[str, Tensor]:
        modules = dict(model.named_modules())
        return {factor.name: modules[factor.name].weight for factor in self.factors}

    def _squared_norm(self, model: nn.Module) -> float:
        return float(sum(w.detach().double().square().sum() for w in self._weights(model).values()))

    @property
    def num_params(self) -> int:
        """P, the number of weights under the Laplace posterior."""
        return sum(f.output_values.numel() * f.input_values.numel() for f in self.factors)

    def log_marginal_likelihood(self, prior_precision: float, theta_norm: float | None = None) -> float:
        """The λ-dependent part of the Laplace log marginal likelihood:
        −½ λ ‖θ*‖² + (P/2) log λ − ½ Σ log D."""
        norm = self._theta_norm if theta_norm is None else theta_norm
        if norm is None:
            raise ValueError("the weight norm is unknown: fit the Laplace approximation first")
        log_det = sum(float(f.eigen_grid(prior_precision).log().sum()) for f in self.factors)
        return -0.5 * prior_precision * norm + 0.5 * self.num_params * math.log(prior_precision) - 0.5 * log_det

    def optimize_prior_precision(self, low: float = 1e-4, high: float = 1e6) -> float:
        """λ maximising :meth:`log_marginal_likelihood`: a log-spaced grid, then golden-section refinement."""
        grid = torch.logspace(math.log10(low), math.log10(high), 61, dtype=torch.float64).tolist()
        values = [self.log_marginal_likelihood(p) for p in grid]
        best = max(range(len(grid)), key=values.__getitem__)
        left, right = math.log(grid[max(best - 1, 0)]), math.log(grid[min(best + 1, len(grid) - 1)])
        ratio = (math.sqrt(5) - 1) / 2
        for _ in range(40):
            inner_left, inner_right = right - ratio * (right - left), left + ratio * (right - left)
            if self.log_marginal_likelihood(math.exp(inner_left)) < self.log_marginal_likelihood(math.exp(inner_right)):
                left = inner_left
            else:
                right = inner_right
        self.prior_precision = math.exp((left + right) / 2)
        return self.prior_precision

    def select_prior_precision_on(
        self,
        model: nn.Module,
        scorer: Scorer,
        examples: Sequence,
        grid: Sequence[float] | None = None,
        batch_size: int = 8,
    ) -> float:
        """λ from ``grid`` (log-spaced, 1e-2 .. 1e6) with the smallest NLL of the linearised predictive on
        held-out ``examples`` (their gradients are computed once, every λ reuses them)."""
        grid = list(grid) if grid is not None else torch.logspace(-2, 6, 17).tolist()
        totals = torch.zeros(len(grid), dtype=torch.float64)
        generator = torch.Generator().manual_seed(0)
        device = model_device(model)
        for indices in iterate_batches(examples, batch_size):
            batch = move_batch(scorer.collate([examples[i] for i in indices]), device)
            logits, projected = self.projected_gradients(model, scorer, batch)
            labels = batch["labels"]
            for k, prior in enumerate(grid):
                covariance = self.covariance(projected, batch["choice_mask"], prior)
                probs = self.glm_predictive(logits, covariance, generator=generator)
                totals[k] -= probs.gather(-1, labels[:, None]).clamp_min(1e-12).log().sum().cpu()
        self.prior_precision = float(grid[int(totals.argmin())])
        return self.prior_precision

    # --- prediction ---
    def projected_gradients(self, model: nn.Module, scorer: Scorer, batch: Batch) -> tuple[Tensor, list[Tensor]]:
        """``(f* (B, C), [P per LoRA map, (B, C, out, in)])``: the class scores at the trained weights and the
        per-example gradients ∂f_c/∂W (summed over each example's rows and tokens) in the posterior eigenbasis,
        from one backward pass per class."""
        modules = self._modules(model)
        linears = {f.name: m for f, m in zip(self.factors, modules, strict=True)}
        mask = batch["choice_mask"]
        examples = batch["sequence_example"]
        num_examples, num_classes = mask.shape
        projected: dict[str, list[Tensor]] = {name: [] for name in linears}
        with _recording(linears) as recorder, _differentiable(linears):
            logits = scorer.class_logits(model, batch)  # (B, C)
            for c in range(num_classes):
                score = logits[:, c].masked_fill(~mask[:, c], 0.0).sum()
                score.backward(retain_graph=c < num_classes - 1)
                for factor in self.factors:
                    a, delta = recorder.inputs[factor.name].double(), recorder.grads[factor.name].double()
                    a = a.reshape(a.shape[0], -1, a.shape[-1])  # (R, T, in)
                    delta = delta.reshape(delta.shape[0], -1, delta.shape[-1])  # (R, T, out)
                    per_row = torch.einsum("rto,rti->roi", delta, a)  # row gradients, (R, out, in)
                    rows = recorder.row_examples[factor.name]
                    rows = examples if rows is None or rows.shape[0] != per_row.shape[0] else rows.to(examples.device)
                    per_example = per_row.new_zeros(num_examples, *per_row.shape[1:]).index_add(0, rows, per_row)
                    projected[factor.name].append(factor.to_eigenbasis(per_example))  # (B, out, in)
        return logits.detach().double(), [torch.stack(projected[f.name], 1) for f in self.factors]

    def covariance(self, projected: list[Tensor], mask: Tensor, prior_precision: float | None = None) -> Tensor:
        """J Σ Jᵀ per example, (B, C, C): Σ over LoRA maps of Σ_ij P_c,ij P_c',ij / D_ij (0 for missing choices)."""
        prior = self.prior_precision if prior_precision is None else prior_precision
        total = None
        for factor, gradients in zip(self.factors, projected, strict=True):
            flat = (gradients / factor.eigen_grid(prior).sqrt()).flatten(2)  # (B, C, out·in)
            part = flat @ flat.transpose(1, 2)
            total = part if total is None else total + part
        return total * (mask[:, :, None] & mask[:, None, :])

    def _modules(self, model: nn.Module) -> list[nn.Module]:
        modules = dict(model.named_modules())
        missing = [f.name for f in self.factors if f.name not in modules]
        if missing:
            raise ValueError(f"the Laplace posterior refers to modules the model lacks: {', '.join(missing[:3])}")
        return [modules[f.name] for f in self.factors]

    def glm_predictive(
        self, logits: Tensor, covariance: Tensor, draws: int = GAUSSIAN_DRAWS, generator=None, keep: int = 0
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Mean softmax of ``draws`` samples of f ~ N(f*, J Σ Jᵀ), (B, C); missing choices stay at 0. With ``keep``,
        also the softmax of the first ``keep`` draws, (keep, B, C) (for the entropies of single samples)."""
        return gaussian_softmax(logits, covariance, "glm", draws=draws, generator=generator, keep=keep)

    @contextmanager
    def sampled_weights(self, model: nn.Module, generator=None) -> Iterator[None]:
        """Within the block, the LoRA weights are one posterior sample W* + U_G (E ⊙ D^{-1/2}) U_Aᵀ."""
        modules = self._modules(model)
        saved = [m.weight.detach().clone() for m in modules]
        try:
            with torch.no_grad():
                for factor, module in zip(self.factors, modules, strict=True):
                    scale = factor.eigen_grid(self.prior_precision).rsqrt()  # (out, in)
                    noise = torch.randn(scale.shape, dtype=scale.dtype, generator=generator).to(scale.device)
                    module.weight.add_(factor.from_eigenbasis(noise * scale).to(module.weight.dtype))
            yield
        finally:
            with torch.no_grad():
                for module, weight in zip(modules, saved, strict=True):
                    module.weight.copy_(weight)

    def predict_batch(
        self, model: nn.Module, scorer: Scorer, batch: Batch, predictive: str = "glm", n_samples: int = 10
    ) -> tuple[Tensor, Tensor]:
        """``(probs (B, C), per-sample probs (S, B, C))``: the linearised predictive (its Monte Carlo mean over
        :data:`GAUSSIAN_DRAWS` draws of the class scores, and ``n_samples`` of those draws) or the average over
        ``n_samples`` weight samples (``nn``, one forward pass each)."""
        if predictive not in PREDICTIVES:
            raise ValueError(f"laplace predictive must be one of {', '.join(PREDICTIVES)}, got '{predictive}'")
        batch = move_batch(batch, model_device(model))
        if predictive == "glm":
            logits, projected = self.projected_gradients(model, scorer, batch)
            covariance = self.covariance(projected, batch["choice_mask"])
            probs, draws = self.glm_predictive(logits, covariance, keep=max(n_samples, 1))
            return probs.float(), draws.float()
        per_sample = []
        for _ in range(max(n_samples, 1)):
            with self.sampled_weights(model), torch.no_grad():
                per_sample.append(scorer.class_logits(model, batch).float().softmax(-1))
        samples = torch.stack(per_sample)
        return samples.mean(0), samples

    # --- files ---
    def save(self, path: str | Path) -> None:
        """The factors and λ in one safetensors file (atomically)."""
        tensors, names = {}, []
        for k, factor in enumerate(self.factors):
            names.append(factor.name)
            tensors[f"{k}.input_values"] = factor.input_values.contiguous()
            tensors[f"{k}.input_vectors"] = factor.input_vectors.contiguous()
            tensors[f"{k}.output_values"] = factor.output_values.contiguous()
            if factor.output_vectors is not None:
                tensors[f"{k}.output_vectors"] = factor.output_vectors.contiguous()
        metadata = {
            "names": "\n".join(names),
            "prior_precision": repr(self.prior_precision),
            "subset": self.subset,
            "theta_norm": repr(self._theta_norm),
        }
        with atomic_path(path) as tmp:
            save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> KronLaplace:
        """Read what :meth:`save` wrote."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata()
            tensors = load_file(str(path), device=str(device))
        except Exception as error:  # safetensors raises several types for a damaged file
            raise ValueError(f"{path} is not a readable Laplace posterior: {error}") from error
        factors = [
            KronFactor(
                name,
                tensors[f"{k}.input_values"],
                tensors[f"{k}.input_vectors"],
                tensors[f"{k}.output_values"],
                tensors.get(f"{k}.output_vectors"),
            )
            for k, name in enumerate(metadata["names"].split("\n"))
        ]
        laplace = cls(factors, float(metadata["prior_precision"]), metadata["subset"])
        theta = metadata.get("theta_norm")
        laplace._theta_norm = None if theta in (None, "None") else float(theta)
        return laplace
