"""The run directory: what a training run leaves behind, and how it is created safely.

Layout::

    <run>/
      config.yaml          the resolved RunConfig + library versions (enough to reproduce the run)
      train_log.jsonl      one JSON object per logging step (loss, nll, learning rate, ...)
      train_summary.json   steps, wall time, step time, peak memory, trainable parameters
      adapter/             PEFT format: adapter_config.json + adapter_model.safetensors
      eval/<task>/         metrics.json, reliability.png, predictions.safetensors
      bops.json            B-LoRA: bit operations per layer and in total, against the 16-bit LoRA
      structure.png        B-LoRA: learned rank and bit-width per block and module
      laplace.safetensors  Laplace-LoRA: the K-FAC posterior factors and prior precision
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..io import read_yaml

CONFIG_FILE = "config.yaml"
TRAIN_LOG = "train_log.jsonl"
TRAIN_SUMMARY = "train_summary.json"
ADAPTER_DIR = "adapter"
EVAL_DIR = "eval"
BOPS_FILE = "bops.json"
STRUCTURE_PLOT = "structure.png"
LAPLACE_FILE = "laplace.safetensors"


class RunExistsError(FileExistsError):
    """The run directory already exists and overwriting was not requested."""


def eval_dir(run_dir: str | Path, task: str) -> Path:
    """``<run>/eval/<task>`` with the task name made safe as one path component."""
    name = Path(task).stem if task.endswith(".jsonl") else task
    return Path(run_dir) / EVAL_DIR / name.replace("/", "-").replace(":", "-")


@contextmanager
def new_run_dir(
    path: str | Path, overwrite: bool = False, resumable: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """Create run directory ``path`` for the duration of a run.

    An existing directory is an error unless ``overwrite``; then it is moved aside and deleted only when
    the new run succeeds. If the new run fails, the old directory is put back and the failed attempt is
    kept next to it as ``<name>.failed-<time>``, so no earlier result is ever lost.

    A run in a new directory that fails (an error, Ctrl-C) does not block the next attempt at ``path``: if
    ``resumable(path)`` says it left something to continue from (a checkpoint), it stays for ``--resume``;
    otherwise what it wrote is moved aside to ``<name>.failed-<time>`` (an empty directory is removed).
    """
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup = None
    if path.exists():
        if not overwrite:
            raise RunExistsError(
                f"Run directory {path} already exists. Choose another --output-dir, or pass --overwrite to "
                f"replace it (the old run is kept until the new one finishes)."
            )
        backup = path.with_name(f".{path.name}.replaced-{stamp}")
        os.replace(path, backup)
    path.mkdir(parents=True)
    try:
        yield path
    except BaseException:
        failed = path.with_name(f"{path.name}.failed-{stamp}")
        if backup is not None:
            os.replace(path, failed)
            os.replace(backup, path)
            print(f"The run failed; {path} is restored, the failed attempt is in {failed}.", file=sys.stderr)
        elif resumable is not None and resumable(path):
            print(f"The run stopped; continue it with --resume --output-dir {path}.", file=sys.stderr)
        elif not any(path.iterdir()):
            path.rmdir()
        else:
            os.replace(path, failed)
            print(f"The run failed; what it wrote is kept in {failed}.", file=sys.stderr)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def has_adapter(adapter_dir: Path) -> bool:
    """Whether ``adapter_dir`` holds a saved PEFT adapter, or one per named adapter (an ensemble's members)."""
    if (adapter_dir / "adapter_config.json").is_file():
        return True
    return adapter_dir.is_dir() and any((p / "adapter_config.json").is_file() for p in adapter_dir.iterdir())


def read_run_config(run_dir: str | Path) -> dict:
    """The ``config.yaml`` of a finished run, with a clear error if ``run_dir`` is not one."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise FileNotFoundError(f"Run directory {run_dir} does not exist.")
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a bayeslora run directory: {CONFIG_FILE} is missing.")
    if not has_adapter(run_dir / ADAPTER_DIR):
        raise FileNotFoundError(
            f"{run_dir} holds no trained adapter ({ADAPTER_DIR}/adapter_config.json is missing): the run did not "
            f"finish. Train it again with --overwrite."
        )
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a bayeslora run configuration (expected a mapping of options).")
    return with_legacy_defaults(data)


#: The first line bayeslora writes into a run's ``config.yaml`` (a recipe that starts with it is one).
CONFIG_HEADER = "# bayeslora run configuration (resolved)."

#: B-LoRA's gate options at the defaults of older versions (--gate-lr 0.05 before it was derived from the run's
#: length, --gate-travel 4 and no --gate-budget before 2026-12-07). Every method's config.yaml records them.
LEGACY_GATE_OPTIONS: dict[str, object] = {"gate_lr": 0.05, "gate_travel": 4.0, "gate_budget": None}


def with_legacy_defaults(options: dict) -> dict:
    """A run's stored options (its ``config.yaml``), read as the version that wrote it meant them: an option added
    later has the value it had before it existed (a run written before ``factor_norm`` trained its core with free
    factors, a B-LoRA run written before ``gate_budget`` had no budget), and in another method's configuration
    B-LoRA's gate options at an older default (:data:`LEGACY_GATE_OPTIONS`) are dropped: they did nothing there,
    and kept they would look chosen (warned about as options the method does not use) once the default changed."""
    options = {"factor_norm": "free", **options}
    if options.get("method") == "blora":
        return {"gate_budget": None, **options}
    return {
        key: value
        for key, value in options.items()
        if not (key in LEGACY_GATE_OPTIONS and value == LEGACY_GATE_OPTIONS[key])
    }
