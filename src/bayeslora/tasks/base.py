"""What a task is: examples of two kinds, and the train / evaluation splits that hold them."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

TaskKind = Literal["multiple-choice", "classification", "instruction"]


def default_cloze_context(question: str) -> str:
    """The cloze prompt each choice continues: ``"Question: {question}\\nAnswer:"`` (OLMES / lm-eval style)."""
    return f"Question: {question}\nAnswer:"


@dataclass(frozen=True)
class MultipleChoiceExample:
    """A question with candidate answers, for causal language models.

    ``question`` and ``choices`` feed the letter prompt (choices listed as A., B., ...). For cloze scoring,
    choice ``i`` is the text ``continuations[i]`` following ``contexts[i]``; for most tasks every context
    is the same question prompt, for WinoGrande the context holds the sentence up to the blank, filled
    with choice ``i``, and the continuation is the rest of the sentence.
    """

    question: str
    choices: tuple[str, ...]
    answer: int
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]

    @classmethod
    def from_question(
        cls, question: str, choices: Sequence[str], answer: int, context: str | None = None
    ) -> MultipleChoiceExample:
        """An example whose choices all continue one prompt (``context``, default the question prompt)."""
        choices = tuple(choices)
        context = default_cloze_context(question) if context is None else context
        return cls(
            question=question,
            choices=choices,
            answer=answer,
            contexts=(context,) * len(choices),
            continuations=tuple(" " + choice.strip() for choice in choices),
        )

    def __post_init__(self) -> None:
        n = len(self.choices)
        if n < 2:
            raise ValueError(f"a multiple-choice example needs at least 2 choices, got {n}")
        if not 0 <= self.answer < n:
            raise ValueError(f"answer {self.answer} is out of range for {n} choices")
        if len(self.contexts) != n or len(self.continuations) != n:
            raise ValueError("contexts and continuations need one entry per choice")

    @property
    def num_classes(self) -> int:
        return len(self.choices)

    @property
    def label(self) -> int:
        return self.answer

    def to_dict(self) -> dict:
        return {
            "question": self.question,
            "choices": list(self.choices),
            "answer": self.answer,
            "contexts": list(self.contexts),
            "continuations": list(self.continuations),
        }

    @classmethod
    def from_dict(cls, row: dict) -> MultipleChoiceExample:
        return cls(
            question=row["question"],
            choices=tuple(row["choices"]),
            answer=row["answer"],
            contexts=tuple(row["contexts"]),
            continuations=tuple(row["continuations"]),
        )


@dataclass(frozen=True)
class ClassificationExample:
    """A text (or text pair) with a class label, for sequence-classification heads."""

    text: str
    label: int
    text_pair: str | None = None

    def to_dict(self) -> dict:
        return {"text": self.text, "text_pair": self.text_pair, "label": self.label}

    @classmethod
    def from_dict(cls, row: dict) -> ClassificationExample:
        return cls(text=row["text"], label=row["label"], text_pair=row.get("text_pair"))


@dataclass(frozen=True)
class InstructionExample:
    """Free text for causal language models: a prompt and the completion the model should write (the loss and the
    evaluation cover the completion's tokens only). Given as ``messages`` (a chat, rendered with the tokenizer's chat
    template), the completion is the last assistant turn and the prompt every turn before it."""

    prompt: str
    completion: str
    messages: tuple[tuple[str, str], ...] | None = None  # ((role, content), ...) of a chat, completion last

    label = 0  # no classes: evaluation measures the completion's likelihood
    num_classes = 0

    @classmethod
    def from_messages(cls, messages: Sequence[dict]) -> InstructionExample:
        """A chat whose last turn is the assistant's completion."""
        turns = tuple((str(m["role"]), str(m["content"])) for m in messages)
        if len(turns) < 2 or turns[-1][0] != "assistant":
            raise ValueError('"messages" needs at least one turn before a last "assistant" turn (the completion)')
        return cls(prompt=turns[-2][1], completion=turns[-1][1], messages=turns)

    def chat(self) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """``(prompt turns, all turns)`` as chat-template messages (a plain prompt is one user turn)."""
        turns = self.messages or (("user", self.prompt), ("assistant", self.completion))
        messages = [{"role": role, "content": content} for role, content in turns]
        return messages[:-1], messages

    def to_dict(self) -> dict:
        if self.messages:
            return {"messages": [{"role": r, "content": c} for r, c in self.messages]}
        return {"prompt": self.prompt, "completion": self.completion}


Example = MultipleChoiceExample | ClassificationExample | InstructionExample


@dataclass
class Task:
    """A named task with its splits.

    Attributes:
        name: registry name (``arc-easy``) or the file / dataset it came from.
        kind: ``multiple-choice`` (causal LMs) or ``classification`` (sequence-classification heads).
        train: training examples, or None for evaluation-only tasks (MMLU).
        eval: evaluation examples (the validation split for the BLoB suite).
        num_classes: the largest number of choices / labels of any example.
        label_names: class names for classification tasks.
        source: where the data comes from and how it was split (shown in reports).
        heldout_eval: whether ``eval`` is held out from ``train`` (False for a local file, whose single
            list serves as either split).
    """

    name: str
    kind: TaskKind
    train: list[Example] | None
    eval: list[Example]
    num_classes: int
    label_names: list[str] | None = None
    source: str = ""
    heldout_eval: bool = True

    def split(self, name: Literal["train", "eval"]) -> list[Example]:
        """The examples of one split; a clear error for evaluation-only tasks asked to train."""
        examples = self.train if name == "train" else self.eval
        if examples is None:
            raise ValueError(
                f"Task '{self.name}' has no training split (it is for evaluation only). "
                f"Train on another task and evaluate on this one with `bayeslora eval --task {self.name}`."
            )
        if not examples:
            raise ValueError(f"Task '{self.name}' has no {name} examples.")
        return examples


def _seeded_order(n: int, seed: int) -> list[int]:
    """The seeded permutation of ``range(n)`` that subsets and held-out sets are cut from."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def seeded_subset(examples: Sequence, size: int | None, seed: int) -> list:
    """The first ``size`` examples of a seeded permutation (nested: a smaller size gives a prefix of a
    larger one with the same seed). ``None`` or a size >= len keeps everything, in the original order."""
    if size is None or size >= len(examples):
        return list(examples)
    if size <= 0:
        raise ValueError(f"subset size must be positive, got {size}")
    return [examples[i] for i in _seeded_order(len(examples), seed)[:size]]


#: Held-out training examples fitted on after training (a temperature, a Laplace prior), by default.
HELDOUT_EXAMPLES = 200


def seeded_heldout(examples: Sequence, used: int | None, size: int, seed: int) -> list:
    """The (at most) ``size`` examples that follow the first ``used`` of the seeded permutation of
    :func:`seeded_subset`: examples a run trained on the first ``used`` never saw (e.g. to fit a
    temperature). An error if nothing is left."""
    if used is None or used >= len(examples):
        raise ValueError(
            f"no held-out examples: the run trained on all {len(examples)} training examples. Train with "
            f"--train-size smaller than {len(examples)} to keep some for post-hoc calibration."
        )
    if size <= 0:
        raise ValueError(f"the held-out size must be positive, got {size}")
    return [examples[i] for i in _seeded_order(len(examples), seed)[used : used + size]]


def seeded_split(examples: Sequence, test_fraction: float, seed: int) -> tuple[list, list]:
    """Split ``examples`` deterministically into (train, test) with a seeded permutation."""
    order = _seeded_order(len(examples), seed)
    n_test = round(len(examples) * test_fraction)
    test = sorted(order[:n_test])
    train = sorted(order[n_test:])
    return [examples[i] for i in train], [examples[i] for i in test]
