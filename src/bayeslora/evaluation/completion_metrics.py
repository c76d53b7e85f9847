"""The likelihood of completions under the posterior predictive, for instruction data.

Per token, the probabilities of N posterior samples are averaged, each sample fixed for its whole sequence (one pass
over the batch tiled N times, each copy its own weights):

    p̄(y_t | y_<t, prompt) = (1/N) Σ_s p(y_t | y_<t, prompt, θ_s),   NLL = −(1/T) Σ_t log p̄(y_t | ...),

over all T completion tokens of the evaluated rows; perplexity = exp(NLL).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..tasks import InstructionExample
from ..tuners.sampling import posterior_mean
from .predictive import iterate_batches, model_device, move_batch, posterior_copies, using_adapter
from .scoring import IGNORE, Batch, CompletionScorer


@torch.no_grad()
def completion_log_likelihoods(
    model: nn.Module,
    scorer: CompletionScorer,
    batch: Batch,
    n_samples: int = 1,
    *,
    dropout: bool = False,
    members: Sequence[str] = (),
) -> tuple[Tensor, Tensor]:
    """``(log p̄(y_t | ...), mask)`` of one batch, each ``(B, L − 1)`` (float64): per token, the probability averaged
    over ``n_samples`` posterior samples (0: the posterior mean), over MC dropout masks, or over an ensemble's
    members."""
    batch = move_batch(batch, model_device(model))
    rows = batch["input_ids"].shape[0]
    if members:
        per_member = []
        for member in members:
            with using_adapter(model, member):
                per_member.append(scorer.token_log_likelihoods(model, batch)[0])
        draws = torch.stack(per_member)  # (K, B, L - 1)
    elif n_samples == 0:
        with posterior_mean():
            log_likelihood, mask = scorer.token_log_likelihoods(model, batch)
        return log_likelihood.double(), mask
    else:
        tiled = scorer.repeat(batch, n_samples) if n_samples > 1 else batch
        with posterior_copies(model, n_samples, rows, dropout=dropout):
            log_likelihood, _ = scorer.token_log_likelihoods(model, tiled)  # (N·B, L - 1)
        draws = log_likelihood.view(n_samples, rows, -1)  # (N, B, L - 1)
    mask = batch["labels"][:, 1:] != IGNORE
    mixture = torch.logsumexp(draws.double(), 0) - math.log(draws.shape[0])  # log (1/N) Σ_s p_s, (B, L - 1)
    return mixture * mask, mask


def evaluate_completions(
    model: nn.Module,
    scorer: CompletionScorer,
    examples: Sequence[InstructionExample],
    *,
    n_samples: int = 1,
    batch_size: int = 8,
    progress: bool = True,
    dropout: bool = False,
    members: Sequence[str] = (),
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(metrics, per-example records)``: ``token_nll`` (nats per completion token under the posterior predictive),
    ``perplexity``, the token and example counts; per example its id (position), tokens and NLL per token."""
    if not examples:
        raise ValueError("no examples to evaluate")
    was_training = model.training
    model.eval()
    per_example: list[dict[str, Any]] = [{} for _ in examples]
    total, tokens = 0.0, 0
    bar = tqdm(total=len(examples), desc="evaluating", unit="ex", disable=not progress, leave=False)
    try:
        for indices in iterate_batches(examples, batch_size):
            batch = scorer.collate([examples[i] for i in indices])
            log_likelihood, mask = completion_log_likelihoods(
                model, scorer, batch, n_samples, dropout=dropout, members=members
            )
            sums, counts = log_likelihood.sum(1).cpu(), mask.sum(1).cpu()
            for row, index in enumerate(indices):
                count = int(counts[row])
                per_example[index] = {"id": index, "tokens": count, "nll": float(-sums[row] / max(count, 1))}
            total -= float(sums.sum())
            tokens += int(counts.sum())
            bar.update(len(indices))
    finally:
        bar.close()
        model.train(was_training)
    nll = total / max(tokens, 1)
    metrics = {
        "token_nll": nll,
        "perplexity": math.exp(min(nll, 700.0)),
        "n_tokens": tokens,
        "n_examples": len(examples),
        "n_samples": len(members) or max(n_samples, 1),
    }
    return metrics, per_example
