"""``bayeslora predict``: a trained run's predictions, with their uncertainty, for rows that may have no answer."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..evaluation.predictive import predict
from ..evaluation.uncertainty import example_records
from ..io import write_text_atomic
from ..methods import get_method
from ..runs import RunExistsError
from ..tasks.files import inputs_from_rows, load_inputs
from .common import build_scorer, load_run
from .evaluate import resolve_samples


def predict_inputs(
    run: str | Path,
    inputs: str | Path | Sequence[dict[str, Any]],
    *,
    samples: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    **options: Any,
) -> list[dict[str, Any]]:
    """Predict the rows ``inputs`` (a JSONL file, or the rows as dicts) with the run in ``run``.

    Rows have a task file's schema (multiple choice ``{"question", "choices"}`` or classification ``{"text"}``, see
    :mod:`bayeslora.tasks.files`), with or without ``"answer"`` / ``"label"``, and may carry an ``"id"``. Returns one
    record per row, in order: ``id`` (its ``"id"``, else its line number, from 1), ``probs``, ``prediction``,
    ``confidence``, ``entropy``, ``expected_entropy`` (aleatoric) and ``mutual_information`` (epistemic), and where
    the row has an answer, ``label`` and ``correct``. ``samples``: posterior samples (default: the run's method's);
    ``options``: loading options of the run (``dtype``, ``max_length``, ``force_base``, ...).
    """
    if isinstance(inputs, str | Path):
        rows = load_inputs(inputs)
    else:
        rows = inputs_from_rows(list(enumerate(inputs, start=1)))
    loaded = load_run(run, progress=progress, **options)
    config, task = loaded.config, loaded.task
    if rows.kind != task.kind:
        raise ValueError(f"the rows are {rows.kind} but the run was trained on {task.kind} ({config.task})")
    if task.kind == "classification":
        too_many = [
            i for i, answer in zip(rows.ids, rows.answers, strict=True) if answer and answer >= task.num_classes
        ]
        if too_many:
            raise ValueError(f"rows {too_many[:5]} have labels beyond the run's {task.num_classes} classes")
    method = get_method(config.method)
    n_samples = resolve_samples(config, samples)
    num_classes = task.num_classes if task.kind == "classification" else max(e.num_classes for e in rows.examples)
    scorer = build_scorer(task, loaded.tokenizer, config, num_classes=num_classes)
    torch.manual_seed(config.seed)  # sampled predictions are reproducible for a given seed
    prediction = predict(
        loaded.model,
        scorer,
        rows.examples,
        n_samples=n_samples,
        batch_size=batch_size or config.eval_batch_size,
        keep_samples=True,
        progress=progress,
        **method.predictive(config, n_samples, loaded.path),
    )
    labelled = all(answer is not None for answer in rows.answers)
    labels = torch.tensor(rows.answers) if labelled else None
    records = example_records(prediction.probs, prediction.sample_probs, ids=rows.ids, labels=labels)
    if not labelled:  # the rows that have an answer still show it
        for record, answer in zip(records, rows.answers, strict=True):
            if answer is not None:
                record.update(label=answer, correct=record["prediction"] == answer)
    for record, example in zip(records, rows.examples, strict=True):  # no probability on a choice a row lacks
        record["probs"] = record["probs"][: example.num_classes] if hasattr(example, "choices") else record["probs"]
    return records


def write_predictions(records: Sequence[dict[str, Any]], output: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``records`` as JSON lines to ``output`` atomically (an existing file only with ``overwrite``)."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise RunExistsError(f"{output} exists. Pass --overwrite to replace it, or choose another --output.")
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output, "".join(json.dumps(record) + "\n" for record in records))
    return output
