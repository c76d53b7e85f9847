"""Trainer callbacks every run uses: a JSONL log, a progress bar with the loss terms, and the memory of one step."""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ..system import AllocationPeak


class JsonlLogger(TrainerCallback):
    """Append each Trainer log line to a JSONL file (one object per line, with step and epoch, and the fields
    of ``tags`` such as an ensemble member)."""

    def __init__(self, path: str | Path, tags: dict[str, object] | None = None) -> None:
        self.path = Path(path)
        self.tags = dict(tags or {})

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {**self.tags, "step": state.global_step, "epoch": state.epoch}
        record.update({k: v for k, v in logs.items() if isinstance(v, int | float) and math.isfinite(v)})
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


class TermsProgress(ProgressCallback):
    """The Trainer's progress bar, with the latest loss terms beside it: loss, NLL, the KL of Bayesian
    adapters, B-LoRA's expected bit operations (relative to the 16-bit LoRA) and mean learned rank."""

    SHOWN = (("loss", "loss"), ("nll", "nll"), ("kl", "kl"), ("expected_bops_ratio", "E[BOPs]"), ("rank", "rank"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=logs, **kwargs)
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {label: f"{logs[key]:.4g}" for key, label in self.SHOWN if isinstance(logs.get(key), int | float)}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)


class StepMemoryProbe(TrainerCallback):
    """Measure the peak memory of one optimizer step (forward, backward, optimizer update) above what was
    allocated before it: activations kept for the backward pass, gradients and temporaries; the model, the
    batch and the optimizer state are not counted. The probed step is the second (``step=1``, when
    the optimizer state exists), or the only one. See :class:`~bayeslora.system.AllocationPeak`."""

    def __init__(self, step: int = 1) -> None:
        self.step = step
        self.peak_mib: float | None = None
        self._probe: AllocationPeak | None = None

    def on_step_begin(self, args, state, control, model=None, **kwargs) -> None:
        if self._probe is None and state.global_step == min(self.step, max(0, state.max_steps - 1)):
            self._probe = AllocationPeak(next(model.parameters()).device)
            self._probe.__enter__()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if self._probe is not None and self.peak_mib is None:
            self._probe.__exit__(None, None, None)
            self.peak_mib = self._probe.peak_mib
