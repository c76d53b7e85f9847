"""Continuing an interrupted run (``--resume``): which configuration, and how far each adapter got.

A single-adapter run continues from its newest complete ``checkpoints/checkpoint-<step>``. An ensemble trains
its members one after the other: each checkpoints into ``checkpoints/<member>/`` and, when its training ends,
leaves ``checkpoints/<member>/trained/`` (its adapter weights and the numbers of its fit). A resumed ensemble
loads its trained members, continues the first unfinished one from its newest checkpoint (or from its start
if it saved none) and trains the others, so an interruption costs at most the member it stopped in, or with
``--save-steps`` the steps since that member's last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from ..config import RunConfig, make_config
from ..io import read_json, read_yaml, write_dir_atomic, write_text_atomic
from ..methods import get_method
from .layout import ADAPTER_DIR, CONFIG_FILE, RunExistsError, has_adapter, with_legacy_defaults

CHECKPOINTS = "checkpoints"
#: A finished ensemble member's record folder, inside its checkpoint folder.
TRAINED = "trained"
_FIT_RECORD = "fit.json"
_WEIGHTS = "adapter_model.safetensors"
#: The training time up to a checkpoint, written into it (all sessions of the run, not only the one saving).
RUNTIME_FILE = "bayeslora_runtime.json"
#: Written into a checkpoint after every callback has saved its part of the training state (see
#: :class:`CheckpointSeal`).
SEAL_FILE = "bayeslora_saved.json"
#: Written into a checkpoint folder when a session of this version starts training in it: from then on only sealed
#: checkpoints count there.
SEALED_FOLDER_FILE = "bayeslora_sealed_checkpoints.json"

#: Options that say where and how a run is written, not what it computes (free to differ on --resume).
RUN_HANDLING = (
    "resume",
    "overwrite",
    "output_dir",
    "save_steps",
    "save_total_limit",
    "report_to",
    "logging_steps",
    "force_base",
)


def resume_point(config: RunConfig, run_dir: Path) -> RunConfig:
    """The run's stored configuration for ``--resume``, with the run-handling options given again in
    ``config``. Other options of ``config`` that differ from the defaults must agree with the stored ones (a
    resumed run computes what the original would have). Refused for a finished run and for a run with nothing
    to continue from: no complete checkpoint and, for an ensemble, no trained member."""
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"--resume: {run_dir} holds no run to continue ({CONFIG_FILE} is missing).")
    if has_adapter(run_dir / ADAPTER_DIR):
        raise RunExistsError(f"--resume: {run_dir} is a finished run (it has its adapter); nothing to continue.")
    stored = make_config(**with_legacy_defaults(read_yaml(run_dir / CONFIG_FILE)))
    defaults = RunConfig()
    conflicts = [
        f"--{f.name.replace('_', '-')}: {getattr(config, f.name)!r} here, {getattr(stored, f.name)!r} in the run"
        for f in dataclasses.fields(RunConfig)
        if f.name not in RUN_HANDLING
        and getattr(config, f.name) != getattr(defaults, f.name)
        and getattr(config, f.name) != getattr(stored, f.name)
    ]
    if conflicts:
        raise ValueError(
            "--resume continues a run as it was configured; these options differ from "
            f"{run_dir / CONFIG_FILE}:\n  - " + "\n  - ".join(conflicts) + "\nDrop them, or start a new run."
        )
    if not any(steps_done(run_dir, member) for member in get_method(stored.method).members(stored) or [None]):
        raise FileNotFoundError(
            f"--resume: {run_dir} has no checkpoint to continue from (train with --save-steps N to write them; "
            f"an ensemble also continues after its last finished member)."
        )
    given = {  # how the run is written: the stored choices, unless given again here
        name: getattr(config, name)
        for name in RUN_HANDLING
        if name not in ("output_dir", "overwrite") and getattr(config, name) != getattr(defaults, name)
    }
    return dataclasses.replace(stored, **given, output_dir=str(run_dir))


def checkpoint_folder(run: Path, member: str | None) -> Path:
    """Where the Trainer checkpoints the run's adapter, or ensemble ``member``."""
    return run / CHECKPOINTS / member if member else run / CHECKPOINTS


def numbered_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-<step>`` folder in ``folder``, oldest first."""
    return sorted(
        (int(p.name.rsplit("-", 1)[-1]), p) for p in folder.glob("checkpoint-*") if p.name.rsplit("-", 1)[-1].isdigit()
    )


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest ``checkpoint-<step>`` whose saving finished: a process killed while saving leaves an incomplete
    one behind, which is skipped. The Trainer writes its state last, then the callbacks save theirs (the penalty's
    multiplier, early stopping's choice, the training time) and :class:`CheckpointSeal` seals it; in a folder this
    version trained in only sealed checkpoints count, in an older version's those with the Trainer's state and the
    adapter."""
    if not folder.is_dir():
        return None
    complete = [p for _, p in numbered_checkpoints(folder) if (p / "trainer_state.json").is_file() and has_adapter(p)]
    if (folder / SEALED_FOLDER_FILE).is_file():
        complete = [p for p in complete if (p / SEAL_FILE).is_file()]
    return complete[-1] if complete else None


class CheckpointSeal(TrainerCallback):
    """Marks each checkpoint as whole once every other callback has saved into it: added to the Trainer last, so
    that a process killed between the Trainer's save and the callbacks' is not continued from a checkpoint that
    lacks their state (:func:`last_complete_checkpoint` takes the one before). When training starts it marks the
    folder (only sealed checkpoints count there from then on) and seals the checkpoint the session continues from,
    which an older version may have written.

    Args:
        keep: checkpoints kept (``--save-total-limit``), or None for all. The seal deletes the older ones once the
            new checkpoint is sealed, so give the Trainer ``save_total_limit=None``: its own rotation runs before
            the callbacks save, and a process killed in between would be left with an unsealed checkpoint only.
    """

    def __init__(self, keep: int | None = None) -> None:
        if keep is not None and keep < 1:
            raise ValueError(f"CheckpointSeal: keep={keep}; keep at least 1 checkpoint, or None for all.")
        self.keep = keep

    def on_train_begin(self, args, state, control, **kwargs):
        folder = Path(args.output_dir)
        if not state.is_world_process_zero or (state.global_step == 0 and args.save_strategy == "no"):
            return  # a new run without --save-steps: marked at its first checkpoint, if a callback asks for one
        resumed = folder / f"checkpoint-{state.global_step}"
        if state.global_step > 0 and resumed.is_dir():
            self._seal(resumed, state.global_step)
        self._mark(folder)

    def on_step_end(self, args, state, control, **kwargs):
        self._mark_before_a_save(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._mark_before_a_save(args, state, control)

    def _mark_before_a_save(self, args, state, control) -> None:
        """A checkpoint asked for by a callback, with --save-steps unset (the Trainer saves after these hooks, and
        this callback runs last): the folder is marked before the checkpoint is written, so that a process killed
        before its seal does not leave an unmarked folder whose unsealed checkpoint would count."""
        if control.should_save and state.is_world_process_zero:
            self._mark(Path(args.output_dir))

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        _wait_for_every_process()  # each process has saved its part (its random state) before the seal
        if state.is_world_process_zero and checkpoint.is_dir():
            self._mark(checkpoint.parent)
            self._seal(checkpoint, state.global_step)
            if self.keep is not None:
                self._rotate(checkpoint.parent, self.keep)

    @staticmethod
    def _mark(folder: Path) -> None:
        if not (folder / SEALED_FOLDER_FILE).is_file():
            folder.mkdir(parents=True, exist_ok=True)
            write_text_atomic(folder / SEALED_FOLDER_FILE, json.dumps({"seal": SEAL_FILE}) + "\n")

    @staticmethod
    def _seal(checkpoint: Path, step: int) -> None:
        write_text_atomic(checkpoint / SEAL_FILE, json.dumps({"step": step}) + "\n")

    @staticmethod
    def _rotate(folder: Path, keep: int) -> None:
        """Delete every checkpoint older than the newest ``keep`` sealed ones (incomplete ones included)."""
        checkpoints = numbered_checkpoints(folder)
        sealed = [step for step, p in checkpoints if (p / SEAL_FILE).is_file()]
        if len(sealed) > keep:
            oldest_kept = sealed[-keep]
            for step, path in checkpoints:
                if step < oldest_kept:
                    shutil.rmtree(path, ignore_errors=True)


def _wait_for_every_process() -> None:
    """A barrier across the processes of a distributed run (nothing in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a ``checkpoint-<step>`` folder was saved at."""
    return int(checkpoint.name.rsplit("-", 1)[-1])


def checkpoint_runtime(checkpoint: Path) -> float | None:
    """The seconds of training that ``checkpoint`` holds, over every session that led to it; None for a
    checkpoint saved without a record of it (by a bayeslora before the record was kept)."""
    path = checkpoint / RUNTIME_FILE
    return float(read_json(path)["runtime_s"]) if path.is_file() else None


class RuntimeLedger(TrainerCallback):
    """Writes the training time so far into every checkpoint the Trainer saves: ``before_s`` (the time
    recorded in the checkpoint this session resumed from) plus this session's since training began, so that
    a resumed run reports the time of all its sessions (the time lost after a session's last checkpoint is
    not counted: it produced nothing the run kept)."""

    def __init__(self, before_s: float = 0.0) -> None:
        self.before_s = before_s
        self.started = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            runtime = self.before_s + time.perf_counter() - self.started
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                write_text_atomic(checkpoint / RUNTIME_FILE, json.dumps({"runtime_s": round(runtime, 2)}) + "\n")


def steps_done(run: Path, member: str | None) -> float:
    """How far the adapter (or ensemble ``member``) of an interrupted run got: ``inf`` for a trained member,
    else the step of its newest complete checkpoint, else 0."""
    if member is not None and trained_member(run, member) is not None:
        return math.inf
    checkpoint = last_complete_checkpoint(checkpoint_folder(run, member))
    return checkpoint_step(checkpoint) if checkpoint else 0


def truncate_log(path: Path, run: Path) -> None:
    """Keep the log lines of the steps that survive the interruption (a resumed run writes the later ones
    again): those up to each adapter's :func:`steps_done`."""
    if not path.is_file():
        return
    done: dict[str | None, float] = {}
    kept = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        member = entry.get("member")
        if member not in done:
            done[member] = steps_done(run, member)
        if entry.get("step", 0) <= done[member]:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def trained_member(run: Path, member: str) -> Path | None:
    """The record folder of ensemble ``member`` if its training finished, else None."""
    folder = checkpoint_folder(run, member) / TRAINED
    return folder if (folder / _FIT_RECORD).is_file() and (folder / _WEIGHTS).is_file() else None


def save_trained_member(model: nn.Module, member: str, run: Path, fit: dict[str, Any]) -> None:
    """Record the finished ``member``: its adapter weights and ``fit`` (global_step, training_loss,
    step_memory_mib), written atomically."""
    from peft.utils import get_peft_model_state_dict

    weights = get_peft_model_state_dict(model, adapter_name=member, save_embedding_layers=False)

    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(tmp / _WEIGHTS))
        (tmp / _FIT_RECORD).write_text(json.dumps(fit, indent=2) + "\n")

    write_dir_atomic(checkpoint_folder(run, member) / TRAINED, write)


def load_trained_member(model: nn.Module, member: str, run: Path) -> dict[str, Any]:
    """Put the recorded weights of the trained ``member`` into its adapter (which must exist); returns its fit."""
    from peft.utils import set_peft_model_state_dict

    folder = trained_member(run, member)
    if folder is None:
        raise FileNotFoundError(f"{checkpoint_folder(run, member) / TRAINED} holds no trained member {member}")
    weights = load_file(str(folder / _WEIGHTS), device=str(next(model.parameters()).device))
    result = set_peft_model_state_dict(model, weights, adapter_name=member)
    stray = [key for key in getattr(result, "unexpected_keys", []) if member in key]
    if stray:
        raise ValueError(f"{folder}: weights that fit no layer of the model: {stray[:3]}")
    return read_json(folder / _FIT_RECORD)
