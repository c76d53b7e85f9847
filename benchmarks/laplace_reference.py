"""bayeslora's K-FAC Laplace-LoRA against laplace-torch's (0.3), on a model small enough for both.

A two-layer classifier (6 -> 8 -> 3) with PEFT LoRA (r = 2) on both linear layers and 96 training points. The same
LoRA weights are given to both implementations, laplace-torch's `Laplace(..., subset_of_weights="all",
hessian_structure="kron")` (its default curvature: curvlinops' K-FAC of the exact GGN, i.e. the Fisher) and
bayeslora's `KronLaplace.fit`, whose Fisher draws one label per example from the model: its factors are averaged
over many seeds to compare their expectation (their Monte Carlo spread is reported too). Compared:

* every Kronecker factor, and the dense K-FAC Fisher G ⊗ Ā of every LoRA matrix (relative Frobenius error);
* the log marginal likelihood at prior precisions 0.01 ... 1000, up to the log-likelihood term that does not
  depend on λ (differences to λ = 1);
* the linearised predictive's covariance of the class scores, J Σ Jᵀ, on 32 test points, at each λ.

    python benchmarks/laplace_reference.py    # writes benchmarks/results/laplace_reference.{json,md} (~1 min)

Needs laplace-torch without its dependencies (which would replace torch): `make laplace-reference` installs it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
PRIORS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


class TinyClassifier(nn.Module):
    """6 inputs -> 8 hidden (tanh) -> 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(6, 8)
        self.l2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


@dataclass(frozen=True)
class Point:
    """One input and its label, shaped as bayeslora's scorers expect an example."""

    x: tuple[float, ...]
    label: int
    text: str = ""  # for batching by length (all the same)
    text_pair: str | None = None


class TensorScorer:
    """A scorer for :class:`Point`: the model's output are the class scores."""

    num_classes = 3

    def collate(self, points):
        return {
            "x": torch.tensor([p.x for p in points]),
            "labels": torch.tensor([p.label for p in points]),
            "choice_mask": torch.ones(len(points), 3, dtype=torch.bool),
            "sequence_example": torch.arange(len(points)),
        }

    def class_logits(self, model, batch):
        return model(batch["x"])


def problem(seed: int = 0):
    """The LoRA model (random non-zero A and B), training and test points."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(TinyClassifier(), LoraConfig(r=2, target_modules=["l1", "l2"], init_lora_weights=False))
    model.eval()
    teacher = TinyClassifier()
    x = torch.randn(96 + 32, 6)
    with torch.no_grad():
        y = torch.distributions.Categorical(logits=2 * teacher(x)).sample()
    points = [Point(tuple(row.tolist()), int(label)) for row, label in zip(x, y, strict=True)]
    return model, points[:96], points[96:]


def reference(model, train, test):
    """laplace-torch's posterior: its Kronecker factors, log marginal likelihoods and GLM covariances."""
    from laplace import Laplace

    x = torch.tensor([p.x for p in train])
    y = torch.tensor([p.label for p in train])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    la.fit(loader)
    kfacs = [[f.double() for f in F] for F in la.H_facs.kfacs]  # per weight (out, in): [out×out, in×in]
    lml = {p: float(la.log_marginal_likelihood(torch.tensor(p))) for p in PRIORS}
    x_test = torch.tensor([p.x for p in test])
    variances = {}
    for p in PRIORS:
        la.prior_precision = torch.tensor(p)
        _, f_var = la._glm_predictive_distribution(x_test)
        variances[p] = f_var.double()
    return kfacs, lml, variances


def ours(model, train, test, seeds: int):
    """bayeslora's posterior, its factors averaged over ``seeds`` label draws (the spread of single fits too)."""
    from bayeslora.methods.laplace.kfac import KronFactor, KronLaplace

    scorer = TensorScorer()
    fits = [KronLaplace.fit(model, scorer, train, batch_size=32, seed=s) for s in range(seeds)]

    def dense(factor: KronFactor) -> tuple[torch.Tensor, torch.Tensor]:
        g = factor.output_vectors @ torch.diag(factor.output_values) @ factor.output_vectors.T
        a = factor.input_vectors @ torch.diag(factor.input_values) @ factor.input_vectors.T
        return g, a

    per_fit = [[dense(f) for f in fit.factors] for fit in fits]
    averaged = []
    for k, factor in enumerate(fits[0].factors):
        g = torch.stack([fit[k][0] for fit in per_fit]).mean(0)
        a = per_fit[0][k][1]  # the input factor does not depend on the labels
        g_values, g_vectors = torch.linalg.eigh(g)
        a_values, a_vectors = torch.linalg.eigh(a)
        averaged.append(KronFactor(factor.name, a_values.clamp_min(0), a_vectors, g_values.clamp_min(0), g_vectors))
    laplace = KronLaplace(averaged)
    laplace._theta_norm = fits[0]._theta_norm
    lml = {p: laplace.log_marginal_likelihood(p) for p in PRIORS}
    batch = scorer.collate(test)
    _, projected = laplace.projected_gradients(model, scorer, batch)
    variances = {p: laplace.covariance(projected, batch["choice_mask"], p) for p in PRIORS}
    single = [[dense(f) for f in fit.factors] for fit in fits[:20]]
    return laplace, [dense(f) for f in averaged], single, lml, variances


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def compare(seeds: int = 400) -> dict:
    model, train, test = problem()
    ref_kfacs, ref_lml, ref_var = reference(model, train, test)
    _, factors, single, our_lml, our_var = ours(model, train, test, seeds)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    rows = []
    for name, (g, a), ref, fits in zip(names, factors, ref_kfacs, zip(*single, strict=True), strict=True):
        ref_g, ref_a = ref
        rows.append(
            {
                "weight": name.removeprefix("base_model.model.").removesuffix(".weight"),
                "input_factor": relative(a, ref_a),
                "output_factor": relative(g, ref_g),
                "kfac": relative(torch.kron(g, a), torch.kron(ref_g, ref_a)),
                "single_fit_kfac": sum(relative(torch.kron(fg, fa), torch.kron(ref_g, ref_a)) for fg, fa in fits)
                / len(fits),
            }
        )
    lml = [
        {
            "prior_precision": p,
            "ours_minus_at_1": our_lml[p] - our_lml[1.0],
            "reference_minus_at_1": ref_lml[p] - ref_lml[1.0],
        }
        for p in PRIORS
    ]
    covariance = [{"prior_precision": p, "relative_error": relative(our_var[p], ref_var[p])} for p in PRIORS]
    return {"seeds": seeds, "factors": rows, "log_marginal_likelihood": lml, "glm_covariance": covariance}


def markdown(result: dict) -> str:
    lines = [
        "# bayeslora's K-FAC Laplace against laplace-torch 0.3",
        "",
        "A 6 -> 8 -> 3 classifier with PEFT LoRA (r = 2) on both layers, 96 training points; bayeslora's Monte Carlo "
        f"Fisher factors averaged over {result['seeds']} label draws (one draw per fit is what a run uses). Relative "
        "Frobenius errors against laplace-torch's K-FAC of the exact Fisher:",
        "",
        "| LoRA matrix | input factor Ā | output factor G | K-FAC G ⊗ Ā | K-FAC of a single fit |",
        "|---|---|---|---|---|",
    ]
    for row in result["factors"]:
        lines.append(
            f"| {row['weight']} | {row['input_factor']:.2e} | {row['output_factor']:.2e} | {row['kfac']:.2e} | "
            f"{row['single_fit_kfac']:.2e} |"
        )
    lines += [
        "",
        "Log marginal likelihood relative to λ = 1 (the λ-dependent part; laplace-torch's includes the "
        "log-likelihood, a constant in λ), and the relative error of the linearised predictive's class-score "
        "covariance J Σ Jᵀ on 32 test points:",
        "",
        "| λ | ours: LML(λ) − LML(1) | laplace-torch | J Σ Jᵀ relative error |",
        "|---|---|---|---|",
    ]
    for lml, cov in zip(result["log_marginal_likelihood"], result["glm_covariance"], strict=True):
        lines.append(
            f"| {lml['prior_precision']:g} | {lml['ours_minus_at_1']:.3f} | {lml['reference_minus_at_1']:.3f} | "
            f"{cov['relative_error']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    from bayeslora.io import write_json_atomic, write_text_atomic

    result = compare()
    write_json_atomic(RESULTS / "laplace_reference.json", result)
    text = markdown(result)
    write_text_atomic(RESULTS / "laplace_reference.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
