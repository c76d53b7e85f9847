"""Hugging Face datasets as tasks, for users with the network (or a local dataset folder).

Spec: ``hf:<dataset id or folder>[:<config>][?<field>=<column>&...]``. Rows are mapped to one of the
task-file schemas (see :mod:`bayeslora.tasks.files`): multiple choice needs ``question``, ``choices``,
``answer``; classification needs ``text`` and ``label`` (``text_pair`` optional). Columns with those
names are used as they are; others are named in the query part, with dots for nested columns::

    hf:allenai/ai2_arc:ARC-Easy?choices=choices.text&answer=answerKey
    hf:glue:sst2?text=sentence

An answer may be an index or a digit string (0-based; add ``answer_base=1`` for 1-based datasets such
as WinoGrande) or a letter ``A``-``Z``. Training uses the ``train`` split; evaluation uses
``validation``, else ``test``.
"""

from __future__ import annotations

import string
from urllib.parse import parse_qsl

from .base import ClassificationExample, MultipleChoiceExample, Task
from .files import parse_line

_FIELDS = {"question", "choices", "answer", "context", "text", "text_pair", "label", "answer_base"}


def parse_hub_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """``"hf:id:config?a=b"`` -> ``("id", "config", {"a": "b"})``."""
    body = spec.removeprefix("hf:")
    body, _, query = body.partition("?")
    dataset, _, config = body.partition(":")
    if not dataset:
        raise ValueError(f"'{spec}' names no dataset: use hf:<dataset id>[:<config>]")
    mapping = dict(parse_qsl(query, strict_parsing=bool(query)))
    if unknown := set(mapping) - _FIELDS:
        raise ValueError(f"'{spec}': unknown field(s) {sorted(unknown)}; known: {sorted(_FIELDS)}")
    return dataset, config or None, mapping


def _get(row: dict, path: str):
    value = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"column '{path}' is missing (row has {sorted(row)})")
        value = value[part]
    return value


def _normalise(row: dict, mapping: dict[str, str]) -> dict:
    fields = (
        ("question", "choices", "answer", "context")
        if "question" in mapping or "question" in row
        else ("text", "text_pair", "label")
    )
    out = {}
    for name in fields:
        column = mapping.get(name, name)
        if name in ("context", "text_pair") and column not in row and name not in mapping:
            continue
        out[name] = _get(row, column)
    if "answer" in out:
        out["answer"] = _answer_index(out["answer"], int(mapping.get("answer_base", 0)))
    return out


def _answer_index(answer, base: int) -> int:
    if isinstance(answer, str):
        answer = answer.strip()
        if answer.isdigit():
            return int(answer) - base
        if len(answer) == 1 and answer.upper() in string.ascii_uppercase:
            return string.ascii_uppercase.index(answer.upper())
        raise ValueError(f"answer {answer!r} is neither an index nor a letter")
    return int(answer) - base


def load_hub_task(spec: str) -> Task:
    """A :class:`Task` from a Hugging Face dataset (needs the network unless the dataset is cached/local)."""
    import datasets

    dataset_id, config, mapping = parse_hub_spec(spec)
    try:
        splits = datasets.load_dataset(dataset_id, config)
    except Exception as error:  # datasets raises many types for "not found" / offline
        raise ValueError(
            f"Cannot load the Hugging Face dataset '{dataset_id}'"
            f"{f' (config {config})' if config else ''}: {type(error).__name__}: {error}. Without network "
            f"access use the built-in tasks or a local JSONL file."
        ) from error

    def convert(split: str) -> list[MultipleChoiceExample | ClassificationExample]:
        examples = []
        for number, row in enumerate(splits[split]):
            try:
                examples.append(parse_line(_normalise(row, mapping)))
            except ValueError as error:
                raise ValueError(f"{spec}, split {split}, row {number}: {error}") from error
        return examples

    train = convert("train") if "train" in splits else None
    eval_split = next((s for s in ("validation", "test") if s in splits), None)
    if eval_split is None and train is None:
        raise ValueError(f"{spec} has neither a train, validation nor test split (has {list(splits)})")
    evaluation = convert(eval_split) if eval_split else []
    examples = (train or []) + evaluation
    if isinstance(examples[0], MultipleChoiceExample):
        kind, num_classes = "multiple-choice", max(e.num_classes for e in examples)
    else:
        kind, num_classes = "classification", max(e.label for e in examples) + 1
    return Task(
        name=spec,
        kind=kind,
        train=train,
        eval=evaluation,
        num_classes=num_classes,
        source=f"Hugging Face dataset {dataset_id}{f':{config}' if config else ''} (train: train, eval: {eval_split})",
    )
