"""Training on two CPU processes (gloo) equals one process with the same global batch; only rank 0 writes;
the KL term is counted once per example."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from _toy_models import write_word_task
from bayeslora.cli import main


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def four_questions(tmp_path):
    """Four questions: with a global batch of 4, every step sees all of them, whatever the sharding."""
    return write_word_task(tmp_path / "four.jsonl", 4)


def train_args(model_dir, task, out, method: str, batch_size: int) -> list[str]:
    return [
        "--quiet", "train", "--model", str(model_dir), "--task", str(task), "--eval-tasks", str(task),
        "--method", method, "--rank", "2", "--max-steps", "4", "--batch-size", str(batch_size), "--lr", "1e-2",
        "--warmup-ratio", "0", "--logging-steps", "1", "--output-dir", str(out),
    ]  # fmt: skip


def launch_two(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "bayeslora", *args]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_processes_equal_one_with_the_same_global_batch(tiny_llama_dir, four_questions, tmp_path):
    launch_two(train_args(tiny_llama_dir, four_questions, tmp_path / "ddp", "lora", batch_size=2))
    assert main(train_args(tiny_llama_dir, four_questions, tmp_path / "single", "lora", batch_size=4)) == 0
    ddp = load_file(str(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors"))
    single = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    assert ddp.keys() == single.keys()
    for key in ddp:
        torch.testing.assert_close(ddp[key], single[key], atol=1e-5, rtol=1e-4)
    assert not list(tmp_path.glob("ddp.failed-*")) and not list(tmp_path.glob(".ddp.replaced-*"))
    log = [json.loads(line) for line in (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]  # written once, by rank 0
    assert json.loads((tmp_path / "ddp" / "eval" / "four" / "metrics.json").read_text())["n_examples"] == 4


def test_an_ensemble_on_two_processes_equals_one(tiny_llama_dir, four_questions, tmp_path):
    """Each member is its own Trainer run over the processes, in one model with the members' adapters."""
    size = ["--ensemble-size", "2"]
    launch_two([*train_args(tiny_llama_dir, four_questions, tmp_path / "ddp", "ensemble", batch_size=2), *size])
    assert (
        main([*train_args(tiny_llama_dir, four_questions, tmp_path / "single", "ensemble", batch_size=4), *size]) == 0
    )
    for member in ("member0", "member1"):
        ddp, single = (
            load_file(str(tmp_path / run / "adapter" / member / "adapter_model.safetensors"))
            for run in ("ddp", "single")
        )
        assert ddp.keys() == single.keys()
        for key in ddp:
            torch.testing.assert_close(ddp[key], single[key], atol=1e-5, rtol=1e-4)


def test_bayesian_kl_uses_the_global_training_set(tiny_llama_dir, four_questions, tmp_path):
    launch_two(train_args(tiny_llama_dir, four_questions, tmp_path / "melora", "melora", batch_size=2))
    log = [json.loads(line) for line in (tmp_path / "melora" / "train_log.jsonl").read_text().splitlines()]
    entry = next(r for r in log if r.get("step") == 4 and "kl" in r)
    assert entry["kl_term"] == pytest.approx(entry["beta"] * entry["kl"] / 4, rel=1e-4)  # N = 4, not a shard's 2


RANGES_SCRIPT = """
import json, sys, torch
from peft import get_peft_model
from bayeslora.training.distributed import start, world
from bayeslora.tuners import BLoraConfig

start()
rank = world()[0]
torch.manual_seed(0)
config = BLoraConfig(r=2, target_modules=["0"], quantize_base=True)
model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), config)
layer = model.base_model.model[0]
model.train()
layer.phase = "open"
layer(torch.full((1, 8), -3.0 if rank == 0 else 5.0))  # each process sees its own share of the data
layer.calibrate_ranges("default")
json.dump(layer.blora_x_range["default"].tolist(), open(sys.argv[1] + f"/rank{rank}.json", "w"))
"""


def test_activation_ranges_agree_over_processes(tmp_path):
    """B-LoRA's base quantizer sets its activation range from what the warm-up saw: over every process's data."""
    script = tmp_path / "ranges.py"
    script.write_text(RANGES_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(script), str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranges = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranges[0] == ranges[1] == [-3.0, 5.0]
