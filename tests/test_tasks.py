"""The task registry on the embedded data, and the local JSONL parser."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bayeslora.tasks import (
    DATA_SEED,
    TASKS,
    ClassificationExample,
    MultipleChoiceExample,
    TaskFileError,
    UnknownTaskError,
    load_task,
    seeded_heldout,
    seeded_subset,
)
from bayeslora.tasks.files import load_jsonl_task, parse_line
from bayeslora.tasks.hub import parse_hub_spec
from bayeslora.tasks.olmo import parse_oe_document


@pytest.mark.parametrize(
    ("name", "train", "evaluation", "classes"),
    [
        ("arc-easy", 2251, 570, 5),
        ("arc-challenge", 1119, 299, 5),
        ("obqa", 4957, 500, 4),
        ("boolq", 9427, 3270, 2),
        ("wg-s", 640, 1267, 2),
        ("wg-m", 2558, 1267, 2),
        ("sst2", 610, 262, 2),
        ("mrpc", 286, 122, 2),
        ("rte", 194, 83, 2),
    ],
)
def test_builtin_split_sizes(name, train, evaluation, classes):
    task = load_task(name)
    assert (len(task.train), len(task.eval), task.num_classes) == (train, evaluation, classes)
    assert task.source


def test_winogrande_subsets_are_nested_and_fixed():
    small, medium = load_task("wg-s"), load_task("wg-m")
    assert small.train == medium.train[:640]
    assert load_task("wg-s").train == small.train


def test_glue_split_is_disjoint_and_covers_the_validation_set():
    task = load_task("rte")
    texts = [(e.text, e.text_pair) for e in task.train + task.eval]
    assert len(set(texts)) == len(texts) == 277
    assert task.label_names == ["entailment", "not_entailment"]


def test_mmlu_is_evaluation_only():
    task = load_task("mmlu:college_physics")
    assert task.train is None and len(task.eval) == 102
    with pytest.raises(ValueError, match="no training split"):
        task.split("train")
    with pytest.raises(UnknownTaskError, match="Unknown MMLU subject"):
        load_task("mmlu:astrology")


def test_winogrande_cloze_fills_the_blank_with_each_option():
    doc = {
        "sentence": "Sarah was a better surgeon than Maria so _ got the easier cases.",
        "option1": "Sarah",
        "option2": "Maria",
        "answer": "2",
    }
    example = parse_oe_document("winogrande", doc)
    assert example.answer == 1
    assert example.contexts == (
        "Sarah was a better surgeon than Maria so Sarah",
        "Sarah was a better surgeon than Maria so Maria",
    )
    assert example.continuations == (" got the easier cases.",) * 2


def test_arc_cloze_prompt_and_letter_question():
    example = load_task("arc-easy").eval[0]
    assert example.contexts[0] == f"Question: {example.question}\nAnswer:"
    assert example.continuations[0] == " " + example.choices[0]


def test_unknown_task_names_the_alternatives():
    with pytest.raises(UnknownTaskError, match="arc-easy"):
        load_task("arc-medium")


def write_lines(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_jsonl_multiple_choice_and_classification(tmp_path):
    mc = load_jsonl_task(
        write_lines(
            tmp_path / "mc.jsonl",
            [
                {"question": "2+2?", "choices": ["3", "4"], "answer": 1},
                "",
                {
                    "question": "Sky?",
                    "choices": ["blue", "green", "red"],
                    "answer": 0,
                    "context": "The sky is",
                },
            ],
        )
    )
    assert mc.kind == "multiple-choice" and mc.num_classes == 3 and len(mc.train) == 2
    assert mc.train[1].contexts[0] == "The sky is" and not mc.heldout_eval
    cls = load_jsonl_task(
        write_lines(
            tmp_path / "cls.jsonl",
            [
                {"text": "good", "label": 1},
                {"text": "a", "text_pair": "b", "label": 2},
            ],
        )
    )
    assert cls.kind == "classification" and cls.num_classes == 3


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: not valid JSON"),
        ({"question": "q", "choices": ["a"], "answer": 0}, "at least 2"),
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, "integer index"),
        ({"question": "q", "choices": ["a", "b"], "answer": True}, "integer index"),
        ({"question": "", "choices": ["a", "b"], "answer": 0}, "non-empty string"),
        ({"question": "q", "choices": "ab", "answer": 0}, "list of non-empty strings"),
        ({"text": "t", "label": 0}, "mixes schemas"),
        ({"question": "q", "choices": ["a", "b"], "answer": 0, "extra": 1}, "unknown field"),
        ({"prompt": "q"}, "fit no schema"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_jsonl_errors_name_the_line_and_reason(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [{"question": "ok?", "choices": ["y", "n"], "answer": 0}, line])
    with pytest.raises(TaskFileError, match=message) as error:
        load_jsonl_task(path)
    assert "line 2" in str(error.value)


def test_jsonl_empty_and_missing_files(tmp_path):
    with pytest.raises(TaskFileError, match="no examples"):
        load_jsonl_task(write_lines(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(TaskFileError, match="does not exist"):
        load_jsonl_task(tmp_path / "nope.jsonl")
    with pytest.raises(TaskFileError, match="at least 2 labels"):
        load_jsonl_task(write_lines(tmp_path / "one.jsonl", [{"text": "x", "label": 0}]))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)
field_names = st.sampled_from(["question", "choices", "answer", "context", "text", "text_pair", "label", "id", "x"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(field_names, json_values, max_size=5) | json_values)
def test_parser_accepts_or_explains_any_json(row):
    """Any decoded JSON either parses into a valid example or raises ValueError with a reason."""
    try:
        example = parse_line(row)
    except ValueError as error:
        assert str(error)
        return
    if isinstance(example, MultipleChoiceExample):
        assert 0 <= example.answer < len(example.choices) >= 2
    else:
        assert isinstance(example, ClassificationExample) and example.label >= 0


@settings(max_examples=100, deadline=None)
@given(
    st.text(min_size=1).filter(str.strip),
    st.lists(st.text(min_size=1).filter(str.strip), min_size=2, max_size=6),
    st.data(),
)
def test_valid_multiple_choice_lines_round_trip(question, choices, data):
    answer = data.draw(st.integers(0, len(choices) - 1))
    example = parse_line(json.loads(json.dumps({"question": question, "choices": choices, "answer": answer})))
    assert example.answer == answer and example.choices == tuple(choices)
    assert MultipleChoiceExample.from_dict(example.to_dict()) == example


def test_hub_spec_parsing():
    assert parse_hub_spec("hf:allenai/ai2_arc:ARC-Easy?choices=choices.text&answer=answerKey") == (
        "allenai/ai2_arc",
        "ARC-Easy",
        {"choices": "choices.text", "answer": "answerKey"},
    )
    with pytest.raises(ValueError, match="unknown field"):
        parse_hub_spec("hf:x?bogus=1")


def test_hub_loader_on_a_local_dataset_folder(tmp_path):
    """The hf: path through datasets.load_dataset, fed a local folder (no network needed)."""
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [{"q": f"q{i}", "options": {"text": ["a", "b"]}, "key": "B"} for i in range(4)]
    for split in ("train", "validation"):
        write_lines(folder / f"{split}.jsonl", rows)
    task = load_task(f"hf:{folder}?question=q&choices=options.text&answer=key")
    assert task.kind == "multiple-choice" and len(task.train) == len(task.eval) == 4
    assert task.train[0].answer == 1


def test_registry_lists_every_builtin():
    assert {
        "arc-easy",
        "arc-challenge",
        "obqa",
        "boolq",
        "wg-s",
        "wg-m",
        "mmlu",
        "sst2",
        "mrpc",
        "rte",
    } <= set(TASKS)


@pytest.mark.parametrize("used, size", [(8, 200), (8, 16), (8, 5), (23, 200)])
def test_heldout_examples_are_never_training_examples(used, size):
    """What a temperature or a Laplace prior is fitted on was not trained on, even when fewer examples are
    left than asked for (the held-out set was then the tail of the unshuffled split, mostly trained on)."""
    examples = list(range(24))
    trained = seeded_subset(examples, used, DATA_SEED)
    heldout = seeded_heldout(examples, used, size, DATA_SEED)
    assert not set(trained) & set(heldout)
    assert len(heldout) == min(size, len(examples) - used)
    assert seeded_heldout(examples, used, 3, DATA_SEED) == heldout[:3]  # nested, as the subsets are
