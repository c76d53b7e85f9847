"""``bayeslora laplace``: Laplace-LoRA post hoc, a K-FAC Laplace posterior fitted to a finished LoRA (or MAP) run."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..config import make_config
from ..io import read_json, write_json_atomic
from ..methods import get_method
from ..methods.laplace import LAPLACE_OPTIONS, LAPLACE_SOURCES
from ..runs import (
    ADAPTER_DIR,
    CONFIG_FILE,
    TRAIN_LOG,
    TRAIN_SUMMARY,
    eval_dir,
    has_adapter,
    new_run_dir,
    read_run_config,
)
from ..runs.adapters import load_adapter
from ..tasks import DATA_SEED, load_task, seeded_subset
from .common import build_scorer, load_base, load_eval_tasks, write_config
from .evaluate import evaluate_and_write, evaluate_out_of_distribution


def laplace(
    run: str | Path,
    *,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    force_base: bool = False,
    progress: bool = True,
    **options: Any,
) -> Path:
    """Laplace-LoRA post hoc: a K-FAC Laplace posterior over the weights of a finished LoRA or MAP run.

    Writes a new run directory (``output_dir``, default ``<run>-laplace``) of method ``laplace``: the same
    adapter, the posterior (``laplace.safetensors``) and every evaluation of the source run predicted with
    it; the source run is not changed. The result is that of ``train(method="laplace")`` with the LoRA run's
    options and seed (same LoRA, same fit), without training again. ``options``: ``laplace_subset``,
    ``laplace_prior``, ``laplace_predictive``, ``samples``, ``eval_batch_size``. Returns the new run directory.
    """
    source = Path(run)
    stored = read_run_config(source)
    if stored.get("method") not in LAPLACE_SOURCES:
        raise ValueError(
            f"A post-hoc Laplace posterior is fitted to a LoRA or MAP run; {source} is a '{stored.get('method')}' "
            f"run. Train one with --method lora (or map), or train with --method laplace directly."
        )
    if not has_adapter(source / ADAPTER_DIR) or not (source / TRAIN_SUMMARY).is_file():
        raise FileNotFoundError(f"{source} is not a finished run (no adapter or {TRAIN_SUMMARY}): nothing to fit.")
    unknown = sorted(set(options) - set(LAPLACE_OPTIONS))
    if unknown:
        raise ValueError(f"laplace takes the options {', '.join(LAPLACE_OPTIONS)}; not {', '.join(unknown)}")
    out = Path(output_dir) if output_dir is not None else source.with_name(f"{source.name}-laplace")
    if out.resolve() == source.resolve():
        raise ValueError(
            f"--output-dir {out} is the LoRA run the posterior is fitted to; the Laplace run is a new directory "
            f"(by default {source.name}-laplace next to it)."
        )
    config = make_config(
        **{**stored, "samples": None, **options, "method": "laplace", "output_dir": str(out), "force_base": force_base}
    )
    method = get_method("laplace")
    config = method.resolve(config)
    task = load_task(config.task)
    config = method.check_inputs(config, task)
    train_examples = seeded_subset(task.split("train"), config.train_size, DATA_SEED)
    eval_tasks = load_eval_tasks(config, task, config.eval_tasks or [])
    ood_tasks = load_eval_tasks(config, task, config.ood_tasks or [])
    with new_run_dir(out, overwrite) as new:
        model, tokenizer = load_base(config, task, progress=progress)
        model = load_adapter(model, source / ADAPTER_DIR, force=force_base)
        shutil.copytree(source / ADAPTER_DIR, new / ADAPTER_DIR)
        if (source / TRAIN_LOG).is_file():
            shutil.copy2(source / TRAIN_LOG, new / TRAIN_LOG)
        write_config(new / CONFIG_FILE, config)
        fitted = method.after_training(model, config, build_scorer(task, tokenizer, config), task, train_examples, new)
        summary = {**read_json(source / TRAIN_SUMMARY), "method": "laplace", **fitted, "laplace_of": str(source)}
        write_json_atomic(new / TRAIN_SUMMARY, summary)
        for eval_task in eval_tasks:
            evaluate_and_write(model, tokenizer, config, task, eval_task, new, summary, progress=progress)
        if ood_tasks and config.task in (config.eval_tasks or []):
            evaluate_out_of_distribution(
                model, tokenizer, config, task, eval_dir(new, task.name), ood_tasks, new, summary, progress=progress
            )
    return out
