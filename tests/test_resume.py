"""Interrupted runs: killed with SIGKILL in the middle of a step, resumed from the last checkpoint, they end
with the adapter and metrics of an uninterrupted run (gate schedule, KL weight and random streams included)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import bayeslora as bl
from _toy_models import write_word_task
from bayeslora.reporting.report import run_report

SLOW_RUN = r"""
import sys, time
from transformers import TrainerCallback
import bayeslora as bl

class Slow(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= 4:
            time.sleep(0.5)  # room for the test to kill the process inside a step

bl.train(callbacks=[Slow()], progress=False, **OPTIONS)
"""


@pytest.fixture(params=[{"gate_budget": None}, {"gate_budget": 0.5}], ids=["gates", "gate-budget"])
def options(tiny_llama_dir, tmp_path, request):
    """B-LoRA with a Bayesian core; with a gate budget also the penalty's learned multiplier is training state."""
    task = write_word_task(tmp_path / "toy.jsonl", 8)
    return dict(
        model=str(tiny_llama_dir), task=str(task), eval_tasks=[str(task)], method="blora", bayesian_core=True,
        rank=2, max_steps=8, batch_size=2, lr=1e-2, save_steps=2, gate_warmup=0.25, gate_fix=0.25,
        logging_steps=1, samples=3, seed=5, **request.param,
    )  # fmt: skip


def test_killed_run_resumes_to_the_uninterrupted_result(options, tmp_path):
    killed = tmp_path / "killed"
    script = SLOW_RUN.replace("**OPTIONS", f"**{dict(options, output_dir=str(killed))!r}")
    # the same thread count as the resumed and reference runs in this process: reductions split across a
    # different number of threads round differently, and B-LoRA's quantizers turn such last-bit differences into
    # visible ones
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "checkpoint-4" / "trainer_state.json").is_file():
        assert process.poll() is None and time.time() < deadline, "the run ended before its step-4 checkpoint"
        time.sleep(0.05)
    time.sleep(0.3)  # inside step 5
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "adapter").exists()
    before_s = json.loads((killed / "checkpoints" / "checkpoint-4" / "bayeslora_runtime.json").read_text())["runtime_s"]
    assert before_s > 0

    bl.train(output_dir=str(killed), resume=True, progress=False)
    reference = bl.train(**options, output_dir=str(tmp_path / "reference"), progress=False)

    resumed_weights = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    reference_weights = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert resumed_weights.keys() == reference_weights.keys()
    for key in reference_weights:
        torch.testing.assert_close(resumed_weights[key], reference_weights[key], atol=1e-5, rtol=1e-5)
    resumed = json.loads((killed / "eval" / "toy" / "metrics.json").read_text())
    expected = json.loads((reference / "eval" / "toy" / "metrics.json").read_text())
    for key in ("accuracy", "ece", "nll", "brier"):
        assert resumed[key] == pytest.approx(expected[key], abs=1e-5)
    summary = json.loads((killed / "train_summary.json").read_text())
    assert summary["steps"] == 8 and summary["resumed_from_step"] == 4  # step time over the 4 steps run here
    # the training time counts both sessions: the killed one's up to its checkpoint, and this one's
    assert summary["train_runtime_s"] == pytest.approx(before_s + 4 * summary["step_time_s"], abs=0.02)
    assert "train_runtime_unmeasured_steps" not in summary
    log = [json.loads(line) for line in (killed / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 9))  # each step logged once


def test_resume_refuses_what_it_cannot_continue(options, tmp_path):
    with pytest.raises(FileNotFoundError, match="no run to continue"):
        bl.train(output_dir=str(tmp_path / "none"), resume=True, progress=False)
    finished = bl.train(**dict(options, max_steps=2), output_dir=str(tmp_path / "done"), progress=False)
    with pytest.raises(FileExistsError, match="finished run"):
        bl.train(output_dir=str(finished), resume=True, progress=False)
    (finished / "adapter").rename(finished / "adapter-moved")  # looks unfinished now
    with pytest.raises(ValueError, match="--rank: 4 here, 2 in the run"):
        bl.train(output_dir=str(finished), resume=True, rank=4, progress=False)


def test_checkpoints_hold_the_adapter_only_and_resume_from_it(tiny_llama_dir, tmp_path):
    """With lm_head adapted, PEFT would also save the base embedding matrices in every checkpoint."""
    task = write_word_task(tmp_path / "toy.jsonl", 8)
    options = dict(
        model=str(tiny_llama_dir), task=str(task), eval_tasks=[str(task)], rank=2, max_steps=4, batch_size=2,
        lr=1e-2, save_steps=2, target_modules=["q_proj", "lm_head"], seed=3, output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    run = bl.train(**options, progress=False)
    finished = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    checkpoint = load_file(str(run / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"))
    assert checkpoint.keys() == finished.keys() and all("lora_" in key for key in checkpoint)

    from bayeslora.runs.checkpoints import SEAL_FILE, SEALED_FOLDER_FILE, last_complete_checkpoint

    checkpoints = run / "checkpoints"
    assert all((checkpoints / f"checkpoint-{step}" / SEAL_FILE).is_file() for step in (2, 4))
    for name in ("adapter", "eval", "train_summary.json"):  # as if stopped while saving the step-4 checkpoint,
        path = run / name  # after the Trainer's part and before the callbacks' (their files may be missing)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (checkpoints / "checkpoint-4" / SEAL_FILE).unlink()
    assert last_complete_checkpoint(checkpoints).name == "checkpoint-2"
    (checkpoints / "checkpoint-2" / SEAL_FILE).unlink()
    assert last_complete_checkpoint(checkpoints) is None  # no sealed one left in a folder this version trained in
    (checkpoints / SEALED_FOLDER_FILE).unlink()  # an older version's folder: no seals at all
    assert last_complete_checkpoint(checkpoints).name == "checkpoint-4"
    shutil.rmtree(checkpoints / "checkpoint-4")
    bl.train(output_dir=str(run), resume=True, progress=False)  # from checkpoint-2, which it seals
    assert (checkpoints / SEALED_FOLDER_FILE).is_file()
    assert all((checkpoints / f"checkpoint-{step}" / SEAL_FILE).is_file() for step in (2, 4))
    resumed = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    for key in finished:
        torch.testing.assert_close(resumed[key], finished[key], atol=1e-5, rtol=1e-5)


def test_a_run_stopped_before_its_seal_keeps_the_checkpoint_before(tiny_llama_dir, tmp_path):
    """With ``--save-total-limit 1``, a process stopped after the Trainer saved checkpoint-4 and before the seal
    still has checkpoint-2 to continue from: the older checkpoints are deleted only once the new one is sealed."""
    from transformers import TrainerCallback

    from bayeslora.runs.checkpoints import last_complete_checkpoint

    class StopBeforeTheSeal(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise KeyboardInterrupt  # the seal, the last callback, never runs

    task = write_word_task(tmp_path / "toy.jsonl", 8)
    options = dict(
        model=str(tiny_llama_dir), task=str(task), eval_tasks=[str(task)], rank=2, max_steps=6, batch_size=2,
        lr=1e-2, save_steps=2, save_total_limit=1, seed=3, output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        bl.train(**options, callbacks=[StopBeforeTheSeal()], progress=False)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert last_complete_checkpoint(checkpoints).name == "checkpoint-2"
    run = bl.train(output_dir=options["output_dir"], resume=True, progress=False)
    assert json.loads((run / "train_summary.json").read_text())["resumed_from_step"] == 2
    assert [p.name for p in checkpoints.glob("checkpoint-*")] == ["checkpoint-6"]  # the limit holds once sealed


def test_a_checkpoint_asked_for_by_a_callback_counts_only_once_sealed(tiny_llama_dir, tmp_path):
    """Without --save-steps, a checkpoint a callback asks for (the benchmarks' end-of-epoch ones) is written into a
    folder already marked as sealed-only: a process stopped before the seal leaves nothing to continue from, not
    a checkpoint without the callbacks' state."""
    from transformers import TrainerCallback

    from bayeslora.runs.checkpoints import SEALED_FOLDER_FILE, last_complete_checkpoint

    class SaveAtStepTwo(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_save = control.should_save or state.global_step == 2

        def on_save(self, args, state, control, **kwargs):
            raise KeyboardInterrupt  # stopped after the Trainer's save, before the seal

    task = write_word_task(tmp_path / "toy.jsonl", 8)
    with pytest.raises(KeyboardInterrupt):
        bl.train(model=str(tiny_llama_dir), task=str(task), eval_tasks=[str(task)], rank=2, max_steps=4,
                 batch_size=2, lr=1e-2, seed=3, output_dir=str(tmp_path / "run"), callbacks=[SaveAtStepTwo()],
                 progress=False)  # fmt: skip
    checkpoints = next(tmp_path.glob("run*")) / "checkpoints"
    assert (checkpoints / "checkpoint-2" / "trainer_state.json").is_file()
    assert (checkpoints / SEALED_FOLDER_FILE).is_file()
    assert last_complete_checkpoint(checkpoints) is None


@pytest.mark.parametrize("member1_checkpoint", [True, False])
def test_ensemble_resumes_after_its_trained_members(tiny_llama_dir, tmp_path, member1_checkpoint):
    """Stopped in member 1 (after its step-2 checkpoint, or before any): member 0 is loaded, not trained again,
    member 1 continues, member 2 trains, and the ensemble equals the uninterrupted one."""
    task = write_word_task(tmp_path / "toy.jsonl", 8)
    run = bl.train(
        model=str(tiny_llama_dir), task=str(task), eval_tasks=[str(task)], method="ensemble", ensemble_size=3,
        rank=2, max_steps=4, batch_size=2, lr=1e-2, save_steps=2, logging_steps=1, seed=3,
        output_dir=str(tmp_path / "run"), progress=False,
    )  # fmt: skip
    members = ("member0", "member1", "member2")
    finished = {m: load_file(str(run / "adapter" / m / "adapter_model.safetensors")) for m in members}
    expected = json.loads((run / "eval" / "toy" / "metrics.json").read_text())
    for name in ("adapter", "eval", "train_summary.json"):
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(run / "checkpoints" / "member2")
    shutil.rmtree(run / "checkpoints" / "member1" / ("trained" if member1_checkpoint else ""))
    if member1_checkpoint:
        shutil.rmtree(run / "checkpoints" / "member1" / "checkpoint-4")
    record = run / "checkpoints" / "member0" / "trained" / "fit.json"
    member0_s = json.loads(record.read_text())["runtime_s"]
    assert member0_s > 0
    if not member1_checkpoint:  # as a bayeslora that kept no training time would have recorded member 0
        record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "runtime_s"}))

    bl.train(output_dir=str(run), resume=True, progress=False)
    for member in members:
        resumed = load_file(str(run / "adapter" / member / "adapter_model.safetensors"))
        for key in finished[member]:
            torch.testing.assert_close(resumed[key], finished[member][key], atol=1e-5, rtol=1e-5)
    metrics = json.loads((run / "eval" / "toy" / "metrics.json").read_text())
    for key in ("accuracy", "ece", "nll", "brier"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-5)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 12 and summary["resumed_from_step"] == (6 if member1_checkpoint else 4)
    if member1_checkpoint:  # member 0's time and member 1's up to its checkpoint count
        assert summary["train_runtime_s"] > member0_s + 6 * summary["step_time_s"] - 0.02
        assert "train_runtime_unmeasured_steps" not in summary
    else:  # member 0's time is unknown: the total is a lower bound, and says so
        assert summary["train_runtime_unmeasured_steps"] == 4
        assert summary["train_runtime_s"] == pytest.approx(8 * summary["step_time_s"], abs=0.02)
        assert run_report([run]).count("≥") == 1
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    logged = [(entry["member"], entry["step"]) for entry in log if "loss" in entry]
    assert logged == [(m, step) for m in members for step in range(1, 5)]  # member 0 was not trained again


def test_ensemble_without_a_finished_member_or_checkpoint_cannot_resume(tiny_llama_dir, tmp_path):
    task = write_word_task(tmp_path / "toy.jsonl", 8)
    run = bl.train(
        model=str(tiny_llama_dir), task=str(task), method="ensemble", ensemble_size=2, rank=2, max_steps=2,
        batch_size=2, output_dir=str(tmp_path / "run"), progress=False,
    )  # fmt: skip
    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(FileNotFoundError, match="no checkpoint to continue from"):
        bl.train(output_dir=str(run), resume=True, progress=False)


def test_base_quantized_blora_resumed_in_its_warm_up_sets_the_same_activation_ranges(tiny_llama_dir, tmp_path):
    """The inputs seen before the interruption count: the observed range is saved with the checkpoint."""
    task = write_word_task(tmp_path / "toy.jsonl", 8)
    options = dict(
        model=str(tiny_llama_dir), task=str(task), eval_tasks=[str(task)], method="blora", quantize_base=True,
        rank=2, max_steps=8, batch_size=2, lr=1e-2, save_steps=2, save_total_limit=4, gate_warmup=0.5, gate_fix=0.25,
        seed=3,
        output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    run = bl.train(**options, progress=False)
    finished = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    seen = load_file(str(run / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"))
    assert any("blora_x_seen" in key and torch.isfinite(value).all() for key, value in seen.items()), "not saved"
    for name in ("adapter", "eval", "train_summary.json"):
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for step in (4, 6, 8):
        shutil.rmtree(run / "checkpoints" / f"checkpoint-{step}", ignore_errors=True)
    bl.train(output_dir=str(run), resume=True, save_total_limit=4, progress=False)
    resumed = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    ranges = [key for key in finished if "blora_x_range" in key]
    assert ranges
    for key in finished:
        torch.testing.assert_close(resumed[key], finished[key], atol=1e-5, rtol=1e-5)
