"""Laplace-LoRA diagnostics: how good is the K-FAC curvature, and what sets the linearised predictive's variance?

On a finished LoRA run (by default the calibration benchmark's ARC-Easy seed-1 run) this script measures, along
the directions that matter for prediction, the class-score gradients j = ∂f_c/∂θ of evaluation questions:

* the exact Fisher of the training questions, ``jᵀ F j`` with F = Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n (per-example
  Jacobians, no label sampling), against the K-FAC approximation the posterior uses (``jᵀ (Ā ⊗ G) j``) and the
  eigenvalue-corrected one (EK-FAC: K-FAC's eigenbasis, the exact Fisher's diagonal in it; George et al., 2018);
* the predictive variance ``jᵀ (F_kfac + λI)⁻¹ j`` at several prior precisions λ, per group of LoRA matrices,
  against the prior alone, ``‖j‖² / λ``: where the two agree, the data do not constrain the prediction and λ
  alone sets its spread;
* the gap between the two best class scores, the scale the predictive standard deviation is to be compared with.

The Fisher needs one backward pass per class of every training question, so it runs on a subset
(``--train``, default 48 questions; K-FAC is fitted on the same subset).

    python benchmarks/laplace_curvature.py                       # ~2 min on idle cores here
    python benchmarks/laplace_curvature.py --run RUN --train 96 --eval 16

Writes ``benchmarks/results/laplace_curvature/<tag>.json`` and ``<tag>.md``.
"""

from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

from bayeslora.config import make_config
from bayeslora.evaluation.predictive import iterate_batches
from bayeslora.io import write_json_atomic, write_text_atomic
from bayeslora.methods.laplace.kfac import KronLaplace
from bayeslora.pipeline.common import build_scorer, load_base
from bayeslora.runs import read_run_config
from bayeslora.runs.adapters import load_adapter
from bayeslora.tasks import DATA_SEED, load_task, seeded_subset

RESULTS = Path(__file__).resolve().parent / "results" / "laplace_curvature"
DEFAULT_RUN = Path(__file__).resolve().parent / "results" / "calibration" / "runs" / "default" / "arc-easy-lora-seed1"
PRIORS = (1.0, 1e2, 1e4)


def _group(name: str) -> str:
    """``…layers.3.self_attn.q_proj.lora_A.default`` -> ``q_proj.A``."""
    match = re.search(r"([^.]+)\.lora_([AB])\.", name)
    return f"{match.group(1)}.{match.group(2)}" if match else name


def _quantiles(values: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(values.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"p10": float(q[0]), "median": float(q[1]), "p90": float(q[2])}


def exact_fisher(
    laplace: KronLaplace, model, scorer, examples: list, directions: list[torch.Tensor], batch_size: int = 4
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The exact Fisher F = Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n of ``examples`` (J_n their class-score Jacobians,
    p_n the predicted class probabilities; no label sampling), two ways:

    * ``jᵀ F j`` for every direction j in ``directions`` (per LoRA map, (E, C, out, in) in ``laplace``'s
      eigenbasis, as :meth:`KronLaplace.projected_gradients` gives them), (E, C);
    * its diagonal in ``laplace``'s Kronecker eigenbasis, one (out, in) tensor per LoRA map: the eigenvalues
      EK-FAC would use.
    """
    along_total = torch.zeros(directions[0].shape[:2], dtype=torch.float64)
    diagonal = [torch.zeros_like(f.eigen_grid(0.0)) for f in laplace.factors]  # (out, in) each
    for indices in iterate_batches(examples, batch_size):
        batch = scorer.collate([examples[i] for i in indices])
        logits, projected = laplace.projected_gradients(model, scorer, batch)
        p = torch.nan_to_num(logits.softmax(-1))[:, :, None, None]  # (B, C', 1, 1); 0 for missing choices
        along = sum(torch.einsum("bcoi,ekoi->bcek", pt, pe) for pt, pe in zip(projected, directions, strict=True))
        along_total += ((p * along.square()).sum(1) - (p * along).sum(1).square()).sum(0)  # Σ_n vᵀ(diag p − ppᵀ)v
        for k, pt in enumerate(projected):
            diagonal[k] += ((p * pt.square()).sum(1) - (p * pt).sum(1).square()).sum(0)
    return along_total, diagonal


def measure(run: Path, n_train: int, n_eval: int, batch_size: int = 4) -> dict:
    """The measurements described in the module docstring, as a JSON-ready dict."""
    started = time.perf_counter()
    config = make_config(**{**read_run_config(run), "output_dir": str(run)})
    task = load_task(config.task)
    model, tokenizer = load_base(config, task, progress=False)
    model = load_adapter(model, run / "adapter").eval()
    scorer = build_scorer(task, tokenizer, config)
    train = seeded_subset(task.split("train"), config.train_size, DATA_SEED)[:n_train]
    evals = seeded_subset(task.split("eval"), config.limit or 300, DATA_SEED)[:n_eval]
    laplace = KronLaplace.fit(model, scorer, train, batch_size=batch_size, seed=config.seed)

    # Class-score gradients of the evaluation questions in the K-FAC eigenbasis (orthogonal: norms are kept).
    gaps, directions, valid = [], [], []
    for indices in iterate_batches(evals, batch_size):
        batch = scorer.collate([evals[i] for i in indices])
        logits, projected = laplace.projected_gradients(model, scorer, batch)  # (B, C), [(B, C, out, in)]
        top = logits.topk(2, dim=-1).values
        gaps.append(top[:, 0] - top[:, 1])
        directions.append(projected)
        valid.append(batch["choice_mask"])
    eval_j = [torch.cat([d[k] for d in directions]) for k in range(len(laplace.factors))]  # (E, C, out, in)
    valid_mask = torch.cat(valid)  # (E, C)

    exact, diagonal = exact_fisher(laplace, model, scorer, train, eval_j, batch_size)
    kfac = sum((pe.square() * f.eigen_grid(0.0)).sum((-1, -2)) for f, pe in zip(laplace.factors, eval_j, strict=True))
    ekfac = sum((pe.square() * d).sum((-1, -2)) for d, pe in zip(diagonal, eval_j, strict=True))
    norm = sum(pe.square().sum((-1, -2)) for pe in eval_j)
    keep = valid_mask.flatten()
    groups: dict[str, list[int]] = defaultdict(list)
    for k, factor in enumerate(laplace.factors):
        groups[_group(factor.name)].append(k)
    group_norm = {g: sum(eval_j[k].square().sum((-1, -2)) for k in members) for g, members in groups.items()}  # ‖j_g‖²
    variance = {}
    for prior in PRIORS:
        group_variance = {
            group: sum((eval_j[k].square() / laplace.factors[k].eigen_grid(prior)).sum((-1, -2)) for k in members)
            for group, members in sorted(groups.items())
        }  # (E, C) each
        total_ek = sum((pe.square() / (d + prior)).sum((-1, -2)) for d, pe in zip(diagonal, eval_j, strict=True))
        variance[str(prior)] = {
            "std_median": float(sum(group_variance.values()).flatten()[keep].median().sqrt()),
            "ekfac_std_median": float(total_ek.flatten()[keep].median().sqrt()),
            "groups": {
                group: {
                    "variance": float(var.flatten()[keep].median()),
                    "prior_only": float((group_norm[group] / prior).flatten()[keep].median()),
                }
                for group, var in group_variance.items()
            },
        }
    return {
        "run": run.name,
        "train_questions": len(train),
        "eval_questions": len(evals),
        "laplace_params": laplace.num_params,
        "kfac_over_exact": _quantiles((kfac / exact).flatten()[keep]),
        "ekfac_over_exact": _quantiles((ekfac / exact).flatten()[keep]),
        "rayleigh_exact": _quantiles((exact / norm).flatten()[keep]),
        "top2_gap": _quantiles(torch.cat(gaps)),
        "variance": variance,
        "seconds": round(time.perf_counter() - started, 1),
    }


def table(result: dict) -> str:
    """The measurements as markdown."""
    lines = [
        f"Laplace-LoRA curvature on `{result['run']}`: {result['train_questions']} training questions, "
        f"{result['eval_questions']} evaluation questions, {result['laplace_params']:,} LoRA weights.",
        "",
        "| jᵀ F̃ j / jᵀ F j along evaluation class-score gradients | p10 | median | p90 |",
        "|---|---|---|---|",
    ]
    for key, label in (("kfac_over_exact", "K-FAC (the posterior's)"), ("ekfac_over_exact", "EK-FAC")):
        q = result[key]
        lines.append(f"| {label} | {q['p10']:.3g} | {q['median']:.3g} | {q['p90']:.3g} |")
    q, gap = result["rayleigh_exact"], result["top2_gap"]
    lines += [
        "",
        f"Exact Fisher per unit gradient, jᵀ F j / ‖j‖²: median {q['median']:.3g} (p10 {q['p10']:.3g}, p90 "
        f"{q['p90']:.3g}). Gap between the two best class scores: median {gap['median']:.3g}.",
        "",
        "| λ | predictive std of a class score, K-FAC (median) | same, EK-FAC | K-FAC per group: variance / prior "
        "alone ‖j‖²/λ (medians) |",
        "|---|---|---|---|",
    ]
    for prior, row in result["variance"].items():
        parts = ", ".join(
            f"{g} {v['variance']:.3g} / {v['prior_only']:.3g}" for g, v in row["groups"].items() if v["variance"] > 0
        )
        lines.append(f"| {float(prior):g} | {row['std_median']:.3g} | {row['ekfac_std_median']:.3g} | {parts} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN, help="A finished LoRA run directory.")
    parser.add_argument("--train", type=int, default=48, help="Training questions for the Fisher and K-FAC.")
    parser.add_argument("--eval", type=int, default=8, help="Evaluation questions whose gradients are the directions.")
    parser.add_argument("--tag", default="default")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not (args.run / "adapter").is_dir():
        parser.error(f"{args.run} is not a finished LoRA run (no adapter/); run benchmarks/calibration.py first")
    result = measure(args.run, args.train, args.eval)
    write_json_atomic(args.out / f"{args.tag}.json", result)
    write_text_atomic(args.out / f"{args.tag}.md", table(result))
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
