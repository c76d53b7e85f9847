"""Instruction data: training on a completion's tokens, and the completion's likelihood under the posterior predictive.

A row is a prompt and its completion (or a chat whose last assistant turn is the completion). It is rendered as
the model will see it (plain ``prompt + completion``, or through the tokenizer's chat template, the assistant's
turn opened after the prompt), then tokenised; the loss is the mean negative log-likelihood of the completion's
tokens (an end-of-sequence token closes a plain completion, so that the model learns to stop), the prompt's tokens
are context only.

Evaluation averages, per token, the probabilities of N posterior samples, each sample fixed for its whole sequence
(one pass over the batch tiled N times, each copy its own weights):

    p̄(y_t | y_<t, prompt) = (1/N) Σ_s p(y_t | y_<t, prompt, θ_s),   NLL = −(1/T) Σ_t log p̄(y_t | ...),

over all T completion tokens of the evaluated rows; perplexity = exp(NLL).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..tasks import Example, InstructionExample
from ..tuners.sampling import posterior_mean, rows_of_examples, sample_copies, sampling
from .predictive import adapter_dropout, iterate_batches, model_device, move_batch
from .scoring import Batch, Scorer, _pad

IGNORE = -100  # the label of a token that is not predicted (prompt, padding)


class CompletionScorer(Scorer):
    """Collates prompt + completion rows with labels on the completion's tokens only (see the module docstring).

    Args:
        chat_template: render plain ``prompt``/``completion`` rows with the tokenizer's chat template too (chat rows
            always are).
    """

    name = "completion"
    row_groups: ClassVar[dict[str, str]] = {
        "input_ids": "sequence",
        "attention_mask": "sequence",
        "sequence_example": "sequence",
        "labels": "sequence",
    }
    index_keys: ClassVar[dict[str, str]] = {"sequence_example": "sequence"}  # one row per example

    def __init__(self, tokenizer, max_length: int = 512, chat_template: bool = False) -> None:
        super().__init__(tokenizer, num_classes=0, max_length=max_length)
        self.chat_template = chat_template

    def render(self, example: InstructionExample) -> tuple[str, str]:
        """``(prompt text, completion text)`` as the model sees them."""
        if example.messages is None and not self.chat_template:
            return example.prompt, example.completion + (self.tokenizer.eos_token or "")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("chat rows (or --chat-template) need a tokenizer with a chat template")
        prompt_turns, all_turns = example.chat()
        prompt = self.tokenizer.apply_chat_template(prompt_turns, tokenize=False, add_generation_prompt=True)
        whole = self.tokenizer.apply_chat_template(all_turns, tokenize=False)
        if not whole.startswith(prompt):  # a template that renders the last turn differently: keep its own text
            return prompt, example.completion + (self.tokenizer.eos_token or "")
        return prompt, whole[len(prompt) :]

    def encode(self, example: InstructionExample) -> tuple[list[int], list[int], bool]:
        """Prompt and completion token ids, cut to ``max_length`` (the prompt's start first), and whether cut."""
        prompt, completion = self.render(example)
        head = self.tokenizer(prompt).input_ids if prompt else []
        tail = self.tokenizer(completion, add_special_tokens=False).input_ids
        if not tail:
            raise ValueError(f"completion {example.completion!r} encodes to no tokens")
        truncated = len(head) + len(tail) > self.max_length
        if truncated:
            tail = tail[: self.max_length - 1]
            head = head[-(self.max_length - len(tail)) :] if len(tail) < self.max_length else []
        return head, tail, truncated

    def collate(self, examples: Sequence[Example]) -> Batch:
        if not all(isinstance(e, InstructionExample) for e in examples):
            raise TypeError("completion scoring needs instruction examples (prompt/completion or messages)")
        encoded = [self.encode(e) for e in examples]
        self._note_truncation(sum(cut for _, _, cut in encoded))
        rows = [head + tail for head, tail, _ in encoded]
        ids, mask = _pad(rows, self.tokenizer.pad_token_id, side="right")  # (B, L)
        labels = torch.full_like(ids, IGNORE)
        for i, (head, tail, _) in enumerate(encoded):
            labels[i, len(head) : len(head) + len(tail)] = torch.tensor(tail)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "sequence_example": torch.arange(len(rows))}

    def token_log_likelihoods(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        """``(log p(y_t | y_<t), mask)``, each ``(R, L − 1)``: the log-probability of every next token and whether it
        is a completion token (0 elsewhere)."""
        with rows_of_examples(batch["sequence_example"]):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (R, L, V)
        targets = batch["labels"][:, 1:]  # position t predicts token t + 1
        mask = targets != IGNORE
        log_probs = logits[:, :-1].float().log_softmax(-1)  # (R, L - 1, V)
        picked = log_probs.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)  # (R, L - 1)
        return picked * mask, mask

    def training_loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """The mean negative log-likelihood of the batch's completion tokens."""
        log_likelihood, mask = self.token_log_likelihoods(model, batch)
        return -log_likelihood.sum() / mask.sum().clamp_min(1), None

    def class_logits(self, model: nn.Module, batch: Batch) -> Tensor:
        raise TypeError("instruction data has no classes: its evaluation is the completions' likelihood")


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
        previous = model.active_adapter
        try:
            for member in members:
                model.set_adapter(member)
                per_member.append(scorer.token_log_likelihoods(model, batch)[0])
        finally:
            model.set_adapter(previous)
        draws = torch.stack(per_member)  # (K, B, L - 1)
    elif n_samples == 0:
        with posterior_mean():
            log_likelihood, mask = scorer.token_log_likelihoods(model, batch)
        return log_likelihood.double(), mask
    else:
        tiled = scorer.repeat(batch, n_samples) if n_samples > 1 else batch
        with sampling(), sample_copies(rows), adapter_dropout(model, active=dropout):
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
