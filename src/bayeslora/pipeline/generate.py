"""``bayeslora generate``: a run's answers to free-text prompts, N per prompt under posterior samples, with their
agreement (see :mod:`bayeslora.evaluation.generation`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..evaluation.generation import Prompt, PromptAnswers, generate
from ..methods import get_method
from ..tasks.files import TaskFileError
from ..tuners.trunk import sampled_layers
from .common import load_run
from .evaluate import resolve_samples


def load_prompts(path: str | Path) -> list[tuple[object, Prompt]]:
    """``(id, prompt)`` per line of a JSONL file of ``{"prompt": str}`` or ``{"messages": [...]}`` rows (optionally
    with ``"id"``, else the line number)."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"Prompt file {path} does not exist.")
    prompts: list[tuple[object, Prompt]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise TaskFileError(f"{path}, line {number}: not valid JSON ({error.msg}).") from error
        prompt = row.get("prompt", row.get("messages")) if isinstance(row, dict) else None
        valid_messages = isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt)
        if not (isinstance(prompt, str) and prompt.strip()) and not valid_messages:
            raise TaskFileError(
                f'{path}, line {number}: expected {{"prompt": "text"}} or {{"messages": [{{"role": ..., "content": '
                f"...}}]}}."
            )
        prompts.append((row.get("id", number), prompt))
    if not prompts:
        raise TaskFileError(f"Prompt file {path} has no prompts.")
    return prompts


def generate_answers(
    run: str | Path,
    prompts: Sequence[Prompt],
    *,
    samples: int | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 4,
    chat_template: bool | None = None,
    progress: bool = True,
    ids: Sequence[object] | None = None,
    sample_layers: str | None = None,
    **generate_kwargs: Any,
) -> list[dict[str, Any]]:
    """A run's answers to ``prompts`` with their uncertainty, as JSON-ready records: ``id`` (from ``ids``, else the
    position from 1), ``prompt``, ``samples`` and the fields of :class:`~bayeslora.evaluation.generation.PromptAnswers`.
    The answers come from the run's predictive: N posterior samples of a Bayesian adapter (default: the method's
    N; ``sample_layers="last:K"``: of its top K blocks and head only, the posterior mean below), one per ensemble
    member, MC dropout masks, or the one deterministic answer of a LoRA run."""
    loaded = load_run(run, progress=progress, **({"sample_layers": sample_layers} if sample_layers else {}))
    if loaded.task.kind == "classification":
        raise ValueError(
            f"{run} was trained on a classification task: its model has no language-model head to generate"
        )
    config = loaded.config
    method = get_method(config.method)
    n_samples = resolve_samples(config, samples)
    predictive = method.predictive(config, n_samples, loaded.path)
    if "sampler" in predictive:
        raise ValueError(
            f"--method {config.method} predicts through its own class-probability sampler, which generation cannot "
            f"use: generate with the run it was fitted on, or a Bayesian adapter (melora, blob)"
        )
    torch.manual_seed(config.seed)  # the same answers for the same seed
    with sampled_layers(loaded.model, predictive.get("sample_layers", "all")):
        results: list[PromptAnswers] = generate(
            loaded.model,
            loaded.tokenizer,
            list(prompts),
            samples=n_samples if method.is_stochastic(config) else 0,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            chat_template=chat_template,
            dropout=predictive.get("dropout", False),
            members=predictive.get("members", ()),
            **generate_kwargs,
        )
    ids = list(range(1, len(results) + 1)) if ids is None else list(ids)
    return [
        {"id": i, **result.to_dict(), "samples": len(result.answers)} for i, result in zip(ids, results, strict=True)
    ]
