"""Local JSONL task files, validated line by line.

Two schemas, one JSON object per line (blank lines are skipped); every line of a file has the same one:

* multiple choice: ``{"question": str, "choices": [str, ...], "answer": int}`` (at least two choices,
  ``answer`` indexes ``choices``), optionally ``"context": str``, the cloze prompt the choices continue
  (default ``"Question: <question>\\nAnswer:"``);
* classification: ``{"text": str, "text_pair": str (optional), "label": int}`` (labels 0..K-1);
* instruction (free text): ``{"prompt": str, "completion": str}``, or ``{"messages": [{"role", "content"}, ...]}``
  whose last turn is the assistant's (rendered with the tokenizer's chat template); the loss and the evaluation
  (per-token NLL and perplexity of the completions) cover the completion's tokens only.

A file serves as whichever split it is given for: ``--task file.jsonl`` trains on all of it,
``--eval-tasks file.jsonl`` or ``bayeslora eval --task file.jsonl`` evaluates on all of it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .base import ClassificationExample, InstructionExample, MultipleChoiceExample, Task

_MC_KEYS = {"question", "choices", "answer"}
_CLS_KEYS = {"text", "label"}
_MC_ALLOWED = _MC_KEYS | {"context", "id"}
_CLS_ALLOWED = _CLS_KEYS | {"text_pair", "id"}
_PROMPT_KEYS = {"prompt", "completion"}
_CHAT_KEYS = {"messages"}


class TaskFileError(ValueError):
    """A task file line that does not fit its schema; the message names the file, line and reason."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_line(row: object, *, labelled: bool = True) -> MultipleChoiceExample | ClassificationExample:
    """Validate one decoded JSON line and build its example; ``ValueError`` says what is wrong. Without
    ``labelled``, the answer (label) may be left out: the example then holds 0 in its place."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    keys = set(row)
    if not labelled:
        if keys >= _MC_KEYS - {"answer"} and "answer" not in keys:
            return parse_line({**row, "answer": 0})
        if keys >= _CLS_KEYS - {"label"} and "label" not in keys:
            return parse_line({**row, "label": 0})
    if keys >= _MC_KEYS:
        if unknown := keys - _MC_ALLOWED:
            raise ValueError(f"unknown field(s) {sorted(unknown)} for a multiple-choice line")
        question, choices, answer = row["question"], row["choices"], row["answer"]
        if not isinstance(question, str) or not question.strip():
            raise ValueError('"question" must be a non-empty string')
        if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
            raise ValueError('"choices" must be a list of non-empty strings')
        if len(choices) < 2:
            raise ValueError(f'"choices" needs at least 2 entries, got {len(choices)}')
        if not _is_int(answer) or not 0 <= answer < len(choices):
            raise ValueError(f'"answer" must be an integer index into the {len(choices)} choices, got {answer!r}')
        context = row.get("context")
        if context is not None and not isinstance(context, str):
            raise ValueError('"context" must be a string')
        return MultipleChoiceExample.from_question(question.strip(), choices, answer, context=context)
    if keys >= _CLS_KEYS:
        if unknown := keys - _CLS_ALLOWED:
            raise ValueError(f"unknown field(s) {sorted(unknown)} for a classification line")
        text, label, pair = row["text"], row["label"], row.get("text_pair")
        if not isinstance(text, str) or not text.strip():
            raise ValueError('"text" must be a non-empty string')
        if pair is not None and not isinstance(pair, str):
            raise ValueError('"text_pair" must be a string')
        if not _is_int(label) or label < 0:
            raise ValueError(f'"label" must be a non-negative integer, got {label!r}')
        return ClassificationExample(text=text, label=label, text_pair=pair)
    if keys >= _PROMPT_KEYS or keys >= _CHAT_KEYS:
        return _instruction(row, keys)
    raise ValueError(
        f"fields {sorted(keys)} fit no schema: multiple choice needs question, choices, answer; classification "
        f"needs text, label; instruction data needs prompt, completion (or messages)"
    )


def _instruction(row: dict, keys: set[str]) -> InstructionExample:
    """An instruction line: ``{"prompt", "completion"}`` or ``{"messages"}`` (and optionally ``"id"``)."""
    if keys >= _CHAT_KEYS:
        if unknown := keys - _CHAT_KEYS - {"id"}:
            raise ValueError(f"unknown field(s) {sorted(unknown)} for a chat line")
        messages = row["messages"]
        valid = isinstance(messages, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
        if not valid:
            raise ValueError('"messages" must be a list of {"role": str, "content": str}')
        return InstructionExample.from_messages(messages)
    if unknown := keys - _PROMPT_KEYS - {"id"}:
        raise ValueError(f"unknown field(s) {sorted(unknown)} for a prompt/completion line")
    prompt, completion = row["prompt"], row["completion"]
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
        raise ValueError('"prompt" must be a string and "completion" a non-empty string')
    return InstructionExample(prompt=prompt, completion=completion)


def load_jsonl_task(path: str | Path) -> Task:
    """A :class:`Task` from a local JSONL file (both splits are the whole file)."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"Task file {path} does not exist.")
    examples: list[MultipleChoiceExample | ClassificationExample] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                example = parse_line(json.loads(line))
            except json.JSONDecodeError as error:
                raise TaskFileError(f"{path}, line {number}: not valid JSON ({error.msg}).") from error
            except ValueError as error:
                raise TaskFileError(f"{path}, line {number}: {error}.") from error
            if examples and type(example) is not type(examples[0]):
                raise TaskFileError(
                    f"{path}, line {number}: mixes schemas (earlier lines are "
                    f"{_kind_of(examples[0])}, this one is {_kind_of(example)})."
                )
            examples.append(example)
    if not examples:
        raise TaskFileError(f"Task file {path} has no examples.")
    if isinstance(examples[0], MultipleChoiceExample):
        kind, num_classes = "multiple-choice", max(e.num_classes for e in examples)
    elif isinstance(examples[0], InstructionExample):
        kind, num_classes = "instruction", 0
    else:
        kind = "classification"
        num_classes = max(e.label for e in examples) + 1
        if num_classes < 2:
            raise TaskFileError(f"{path}: classification needs at least 2 labels, found only label 0.")
    return Task(
        name=str(path),
        kind=kind,
        train=examples,
        eval=examples,
        num_classes=num_classes,
        source=f"local file {path} ({len(examples)} examples)",
        heldout_eval=False,
    )


@dataclass
class Inputs:
    """Rows to predict, read from a JSONL file whose lines may lack the answer: their examples (0 where the answer
    is missing), ids (a line's ``"id"``, else its line number) and answers (None where missing)."""

    kind: str
    examples: list[MultipleChoiceExample | ClassificationExample]
    ids: list[object]
    answers: list[int | None]


def inputs_from_rows(rows: Sequence[tuple[int, object]], where: Callable[[int], str] = "row {}".format) -> Inputs:
    """:class:`Inputs` from ``(number, row)`` pairs, rows of either schema with or without their answers; a row's id is
    its ``"id"``, else its number. Errors name the row by ``where(number)``."""
    examples, ids, answers = [], [], []
    for number, row in rows:
        try:
            example = parse_line(row, labelled=False)
        except ValueError as error:
            raise TaskFileError(f"{where(number)}: {error}.") from error
        if examples and type(example) is not type(examples[0]):
            raise TaskFileError(f"{where(number)}: mixes schemas with the rows before it.")
        examples.append(example)
        ids.append(row.get("id", number))
        answers.append(row.get("answer", row.get("label")))
    if not examples:
        raise TaskFileError("no rows to predict")
    kind = "multiple-choice" if isinstance(examples[0], MultipleChoiceExample) else "classification"
    return Inputs(kind, examples, ids, answers)


def load_inputs(path: str | Path) -> Inputs:
    """The rows of a JSONL file of either schema (see the module docstring), with or without their answers; ids
    default to the line number."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"Input file {path} does not exist.")
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise TaskFileError(f"{path}, line {number}: not valid JSON ({error.msg}).") from error
    if not rows:
        raise TaskFileError(f"Input file {path} has no rows.")
    return inputs_from_rows(rows, f"{path}, line {{}}".format)


def _kind_of(example) -> str:
    if isinstance(example, InstructionExample):
        return "instruction"
    return "multiple choice" if isinstance(example, MultipleChoiceExample) else "classification"
