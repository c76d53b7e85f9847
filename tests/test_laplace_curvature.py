"""The Laplace curvature diagnostics (benchmarks/laplace_curvature.py): its exact Fisher against a brute-force one
built from per-example Jacobians, and the script end to end on a tiny LoRA run."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

import bayeslora as bl
from _toy_models import write_word_task
from bayeslora.evaluation.scoring import ClozeScorer
from bayeslora.methods.laplace.kfac import KronLaplace
from bayeslora.tasks import MultipleChoiceExample

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from laplace_curvature import exact_fisher, measure, table


def _questions(count: int, offset: int = 0):
    colours = ["blue", "red", "green", "grey"]
    return [
        MultipleChoiceExample.from_question(f"Question {i} about colour?", colours[: 3 + i % 2], i % 3)
        for i in range(offset, offset + count)
    ]


def test_exact_fisher_equals_the_brute_force_fisher(tiny_llama):
    model, tokenizer = tiny_llama
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    scorer = ClozeScorer(tokenizer, num_classes=4)
    train, evals = _questions(5), _questions(3, offset=10)
    laplace = KronLaplace.fit(model, scorer, train, batch_size=2)
    modules = dict(model.named_modules())
    weights = [modules[f.name].weight for f in laplace.factors]
    for weight in weights:
        weight.requires_grad_(True)

    def jacobian(example) -> tuple[torch.Tensor, torch.Tensor]:
        """(class probabilities (C,), class-score Jacobian (C, P)) in float64, missing choices dropped."""
        batch = scorer.collate([example])
        logits = scorer.class_logits(model, batch)[0]
        valid = batch["choice_mask"][0]
        rows = [torch.cat([g.flatten() for g in torch.autograd.grad(logits[c], weights, retain_graph=True)])
                for c in range(int(valid.sum()))]  # fmt: skip
        return logits[valid].detach().double().softmax(-1), torch.stack(rows).double()

    fisher = 0
    for example in train:
        p, J = jacobian(example)
        fisher = fisher + J.T @ (torch.diag(p) - torch.outer(p, p)) @ J  # (P, P)

    _, projected = laplace.projected_gradients(model, scorer, scorer.collate(evals))
    got, diagonal = exact_fisher(laplace, model, scorer, train, projected, batch_size=2)
    for e, example in enumerate(evals):
        _, J = jacobian(example)
        expected = torch.einsum("cp,pq,cq->c", J, fisher, J)
        torch.testing.assert_close(got[e, : len(expected)], expected, rtol=1e-4, atol=1e-9)  # the model runs in float32
        assert (got[e, len(expected) :] == 0).all()
    start = 0
    for factor, diag in zip(laplace.factors, diagonal, strict=True):
        size = diag.numel()
        block = fisher[start : start + size, start : start + size]  # vec(W) row-major: (out, in)
        rotation = torch.kron(factor.output_vectors, factor.input_vectors)  # U_G ⊗ U_A
        torch.testing.assert_close(
            diag.flatten(), (rotation.T @ block @ rotation).diagonal(), rtol=1e-4, atol=1e-9
        )  # the model runs in float32
        start += size
    assert start == fisher.shape[0]


def test_the_curvature_benchmark_runs_on_a_lora_run(tiny_llama_dir, tmp_path):
    task = write_word_task(tmp_path / "toy.jsonl", 16)
    run = bl.train(method="lora", model=str(tiny_llama_dir), task=str(task), rank=2, max_steps=2, batch_size=4,
                   train_size=8, limit=4, output_dir=str(tmp_path / "lora"), progress=False)  # fmt: skip
    result = measure(run, n_train=4, n_eval=2)
    assert result["train_questions"] == 4 and result["eval_questions"] == 2
    for key in ("kfac_over_exact", "ekfac_over_exact", "rayleigh_exact"):
        assert 0 < result[key]["p10"] <= result[key]["median"] <= result[key]["p90"]
    stds = [row["std_median"] for row in result["variance"].values()]
    assert stds == sorted(stds, reverse=True)  # a tighter prior, a narrower predictive
    assert "K-FAC (the posterior's)" in table(result)
