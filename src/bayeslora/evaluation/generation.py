"""Generation with uncertainty: N answers per prompt, each under its own posterior sample, and how much they agree.

For a Bayesian adapter, ``generate`` draws one weight sample per answer and keeps it for the whole answer (every
generated token and its key/value cache: :func:`~bayeslora.tuners.sampling.frozen_samples`); all N answers of all
prompts in a batch come from ONE batched ``model.generate`` call over the prompts repeated N times. An ensemble
answers once per member, MC dropout draws its adapter-dropout masks afresh at every token (as MC dropout does).

Per answer the sequence log-likelihood ``log p(answer | prompt, θ_s) = Σ_t log p(y_t | prompt, y_<t, θ_s)`` is
computed under the sample that wrote it (one more forward pass under the same frozen samples, so it is the model's
probability, not that of the decoding processors). Per prompt, the answers are normalised (case, spaces,
surrounding punctuation) and summarised by the share that agrees with the most common one and by the entropy of the
distinct answers' frequencies, ``H = −Σ_a p_a log p_a`` in nats (0 when all N agree, log N when all differ).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..tuners.sampling import frozen_samples, posterior_mean, rows_of_examples
from .predictive import adapter_dropout, model_device, using_adapter

#: A prompt: plain text, or chat messages ``[{"role": ..., "content": ...}, ...]``.
Prompt = str | Sequence[dict[str, str]]


@dataclass
class Answer:
    """One generated answer: its text, its normalised form, its length in tokens and its sequence log-likelihood
    under the weights that generated it (nats)."""

    text: str
    normalised: str
    tokens: int
    log_likelihood: float


@dataclass
class PromptAnswers:
    """The answers to one prompt and their uncertainty summary.

    Attributes:
        prompt: the prompt as given.
        answers: one per posterior sample (or ensemble member).
        majority: the most common normalised answer (the first generated among ties).
        agreement: the share of answers equal to ``majority`` (1 = all agree).
        answer_entropy: entropy of the distinct normalised answers' frequencies, nats.
        distinct: how many distinct normalised answers there are.
    """

    prompt: Prompt
    answers: list[Answer] = field(default_factory=list)
    majority: str = ""
    agreement: float = 1.0
    answer_entropy: float = 0.0
    distinct: int = 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record."""
        return asdict(self)


_PUNCTUATION = string.punctuation + "“”‘’«»…"


def normalise_answer(text: str) -> str:
    """Lower case, whitespace collapsed, surrounding punctuation and quotes removed: ``" Paris."`` → ``"paris"``."""
    return re.sub(r"\s+", " ", text).strip().strip(_PUNCTUATION + " ").lower()


def answer_agreement(normalised: Sequence[str]) -> tuple[str, float, float, int]:
    """``(majority, agreement, entropy, distinct)`` of normalised answers (see :class:`PromptAnswers`)."""
    if not normalised:
        raise ValueError("no answers to summarise")
    counts = Counter(normalised)  # insertion-ordered: ties go to the first generated
    majority, top = counts.most_common(1)[0]
    n = len(normalised)
    entropy = sum(c / n * math.log(n / c) for c in counts.values())  # = −Σ p log p, exactly 0.0 when all agree
    return majority, top / n, entropy, len(counts)


def render_prompts(tokenizer, prompts: Sequence[Prompt], chat_template: bool | None = None) -> list[str]:
    """The text the model continues: chat messages always through the tokenizer's chat template (with the
    assistant's turn opened); plain strings through it as one user turn if ``chat_template`` is True."""
    rendered = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if isinstance(prompt, str) and not chat_template:
            rendered.append(prompt)
            continue
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "the tokenizer has no chat template: pass plain-text prompts without --chat-template, or use an "
                "instruct model's tokenizer"
            )
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return rendered


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    samples: int = 10,
    max_new_tokens: int = 32,
    batch_size: int = 4,
    chat_template: bool | None = None,
    dropout: bool = False,
    members: Sequence[str] = (),
    stop: Sequence[str] = (),
    **generate_kwargs: Any,
) -> list[PromptAnswers]:
    """N answers per prompt, each under its own posterior sample, with their agreement (see the module docstring).

    Args:
        model: a causal LM, with or without a (Bayesian) PEFT adapter.
        tokenizer: its tokenizer.
        prompts: plain strings or chat-message lists.
        samples: posterior samples, one answer each; 0 answers once with the posterior mean.
        max_new_tokens: the longest answer.
        batch_size: prompts per ``generate`` call (each call runs ``batch_size · samples`` sequences).
        chat_template: render plain strings with the tokenizer's chat template (messages always are).
        dropout: MC dropout: the adapters' dropout on while generating.
        members: an ensemble's member adapters: one answer each (``samples`` is then ignored).
        stop: strings that end an answer (e.g. ``"\n"`` for one-line answers): generation of a sequence stops once
            one appears, and the answer's text ends before it.
        generate_kwargs: passed to ``model.generate`` (default greedy decoding, so that the answers differ only
            through the weights; ``do_sample=True`` adds the decoder's own randomness).

    Returns:
        One :class:`PromptAnswers` per prompt, in order.
    """
    if samples < 0:
        raise ValueError(f"samples must be >= 0 (0 = the posterior mean), got {samples}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not prompts:
        raise ValueError("no prompts to answer")
    texts = render_prompts(tokenizer, prompts, chat_template)
    if stop:
        generate_kwargs = {**generate_kwargs, "stop_strings": list(stop), "tokenizer": tokenizer}
    was_training = model.training
    model.eval()
    results = []
    try:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            if members:
                per_member = [
                    _answer_with_member(model, tokenizer, chunk, m, max_new_tokens, generate_kwargs) for m in members
                ]
                answers = [[member[i][0] for member in per_member] for i in range(len(chunk))]
            else:
                copies = max(samples, 1)
                flat = _answer_batch(
                    model, tokenizer, chunk, copies, samples > 0, dropout, max_new_tokens, generate_kwargs
                )
                answers = [flat[i * copies : (i + 1) * copies] for i in range(len(chunk))]
            for prompt, prompt_answers in zip(prompts[start : start + batch_size], answers, strict=True):
                majority, agreement, entropy, distinct = answer_agreement([a.normalised for a in prompt_answers])
                results.append(PromptAnswers(prompt, prompt_answers, majority, agreement, entropy, distinct))
    finally:
        model.train(was_training)
    return results


def _answer_with_member(
    model: nn.Module, tokenizer, texts: list[str], member: str, max_new_tokens: int, generate_kwargs: dict[str, Any]
) -> list[list[Answer]]:
    """One answer per prompt from ensemble member ``member``."""
    with using_adapter(model, member):
        flat = _answer_batch(model, tokenizer, texts, 1, False, False, max_new_tokens, generate_kwargs)
    return [[answer] for answer in flat]


def _answer_batch(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    copies: int,
    sample: bool,
    dropout: bool,
    max_new_tokens: int,
    generate_kwargs: dict[str, Any],
) -> list[Answer]:
    """``copies`` answers per text (text-major order) from one ``generate`` call over the texts repeated ``copies``
    times; each repeated row its own weight sample if ``sample``, else the posterior mean."""
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues every row from its last position
    try:
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = padding_side
    device = model_device(model)
    input_ids = encoded["input_ids"].repeat_interleave(copies, 0).to(device)  # (B·N, L): prompt i's copies adjacent
    attention = encoded["attention_mask"].repeat_interleave(copies, 0).to(device)
    sequences_count = input_ids.shape[0]
    beams = int(generate_kwargs.get("num_beams", 1) or 1)
    if int(generate_kwargs.get("num_return_sequences", 1) or 1) != 1:
        raise ValueError("num_return_sequences must be 1: the answers per prompt are the posterior samples (samples=)")
    options = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    options.update(generate_kwargs)
    with ExitStack() as stack:
        stack.enter_context(frozen_samples() if sample else posterior_mean())
        stack.enter_context(adapter_dropout(model, active=dropout))
        # all beams of one answer share its sample; the log-likelihood pass below sees one row per answer
        with rows_of_examples(torch.arange(sequences_count, device=device).repeat_interleave(beams)):
            sequences = model.generate(input_ids=input_ids, attention_mask=attention, **options)  # (B·N, L + T)
        generated = sequences[:, input_ids.shape[1] :]  # (B·N, T)
        log_likelihood, lengths = _sequence_log_likelihood(model, sequences, attention, generated, tokenizer)
    texts_out = [_before_stop(text, generate_kwargs.get("stop_strings", ())) for text in
                 tokenizer.batch_decode(generated, skip_special_tokens=True)]  # fmt: skip
    return [
        Answer(text.strip(), normalise_answer(text), int(n), float(ll))
        for text, n, ll in zip(texts_out, lengths.tolist(), log_likelihood.tolist(), strict=True)
    ]


def _before_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first of ``stops`` in it (leading whitespace skipped first: an answer starting on a new line
    is not empty)."""
    body = text.lstrip()
    cut = min((i for i in (body.find(s) for s in stops) if i >= 0), default=len(body))
    return body[:cut]


def _answer_mask(generated: Tensor, tokenizer) -> Tensor:
    """(B·N, T) True for the answer's tokens: up to and including its first end-of-sequence token."""
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    is_stop = torch.zeros_like(generated, dtype=torch.bool)
    for stop in stops:
        is_stop |= generated == stop
    after_stop = (is_stop.cumsum(1) - is_stop.long()) > 0  # strictly after the first stop
    return ~after_stop


def _sequence_log_likelihood(
    model: nn.Module, sequences: Tensor, prompt_mask: Tensor, generated: Tensor, tokenizer
) -> tuple[Tensor, Tensor]:
    """``(log p(answer | prompt), answer lengths)`` per row, from one forward pass over prompt + answer under the
    weights in force (the frozen samples of the generation)."""
    answer_mask = _answer_mask(generated, tokenizer)  # (R, T)
    mask = torch.cat([prompt_mask, answer_mask.long()], dim=1)  # (R, L + T)
    with rows_of_examples(torch.arange(sequences.shape[0], device=sequences.device)):
        logits = model(input_ids=sequences, attention_mask=mask).logits  # (R, L + T, V)
    prompt_length = prompt_mask.shape[1]
    predicting = logits[:, prompt_length - 1 : -1].float().log_softmax(-1)  # position t predicts token t + 1
    token_ll = predicting.gather(-1, generated[..., None]).squeeze(-1)  # (R, T)
    return (token_ll * answer_mask).sum(1), answer_mask.sum(1)
