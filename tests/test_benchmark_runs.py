"""The benchmarks' run handling (benchmarks/_shared.py): a stopped benchmark continues its runs where they
were, and never continues a run started with other options."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import bayeslora as bl
from _toy_models import write_word_task

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from _shared import OPTIONS_FILE, prepare_run


class StopAtStep(TrainerCallback):
    """Interrupt training as Ctrl-C would, at the start of a step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            raise KeyboardInterrupt


def test_a_stopped_benchmark_run_continues_and_other_options_start_again(tiny_llama_dir, tmp_path):
    task = write_word_task(tmp_path / "toy.jsonl", 12)
    options = dict(model=str(tiny_llama_dir), task=str(task), eval_tasks=[str(task)], rank=2, epochs=3,
                   batch_size=4, train_size=8, lr=1e-2, seed=3)  # fmt: skip
    run = tmp_path / "run"
    state, config, callbacks = prepare_run(options, run)
    assert state == "new"
    with pytest.raises(KeyboardInterrupt):  # stopped in the third epoch (2 steps per epoch)
        bl.train(config, progress=False, callbacks=[*callbacks, StopAtStep(5)])
    assert (run / OPTIONS_FILE).is_file() and (run / "checkpoints" / "checkpoint-4").is_dir()

    state, config, callbacks = prepare_run(options, run)
    assert state == "resumed"
    bl.train(config, progress=False, callbacks=callbacks)
    reference = bl.train(**options, output_dir=str(tmp_path / "reference"), progress=False)
    ours, expected = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (run, reference))
    for key in expected:
        torch.testing.assert_close(ours[key], expected[key], atol=1e-5, rtol=1e-5)

    shutil.rmtree(run / "eval")  # stopped while evaluating: only the evaluation is done again
    assert prepare_run(options, run)[:2] == ("trained", None)
    assert (run / "eval" / "toy" / "metrics.json").is_file()
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "run").symlink_to(run)  # the same runs reached through another path are still the same runs
    assert prepare_run(options, moved / "run")[:2] == ("trained", None)

    state, _, _ = prepare_run({**options, "lr": 5e-3}, run)  # other options: never continued
    assert state == "new" and not run.exists()
