"""Adapters that travel: the base named by its Hugging Face id, a model card that says what the adapter is and how
to load it, logging integrations that work or fail early, and commands that print nothing but their own output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from peft import get_peft_model

import bayeslora as bl
from _toy_models import train_toy


def test_adapters_of_the_packaged_model_name_its_hub_id(tmp_path):
    model, _ = bl.load_model("smollm2-135m", num_layers=2, dtype="float32")
    model = get_peft_model(model, bl.MeLoraConfig(r=2, target_modules=["q_proj"]))
    assert model.peft_config["default"].base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    bl.export_lora(model, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_runs_model_card_says_method_task_metrics_and_loading(tiny_llama_dir, toy_task, tmp_path):
    run = train_toy(
        tiny_llama_dir, toy_task, tmp_path / "run", method="melora", report_to=["tensorboard"], train_size=6
    )
    card = (run / "adapter" / "README.md").read_text()
    metrics = json.loads((run / "eval" / "toy" / "metrics.json").read_text())
    assert "# melora adapter of" in card and f"trained on {toy_task}" in card
    assert (
        f"| {toy_task} | {metrics['n_samples']} | {100 * metrics['accuracy']:.1f} | {100 * metrics['ece']:.1f} |"
        in card
    )
    assert "import bayeslora" in card and "--to lora" in card and "frozen_samples" in card
    assert list((run / "checkpoints").rglob("events.out.tfevents.*"))  # --report-to tensorboard logged

    later = bl.evaluate(run, heldout=2, samples=3, progress=False)  # a later evaluation into the run: in the card
    assert f"| {later['task']} | 3 | {100 * later['accuracy']:.1f} |" in (run / "adapter" / "README.md").read_text()
    rows = (run / "adapter" / "README.md").read_text().count("\n| ")
    bl.calibrate(run, heldout=2, progress=False)  # and the temperature-scaled ones
    assert (run / "adapter" / "README.md").read_text().count("\n| ") == rows + 2


@pytest.mark.parametrize(("name", "message"), [("nonsense", "unknown; choose from"), ("wandb", "not installed")])
def test_a_reporting_integration_that_cannot_run_fails_before_loading(name, message, toy_task, tmp_path):
    import importlib.util

    if name == "wandb" and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ValueError, match=message):
        bl.train(model="no/such-model", task=str(toy_task), report_to=[name], output_dir=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_commands_print_no_third_party_import_noise():
    result = subprocess.run([sys.executable, "-m", "bayeslora", "--help"], capture_output=True, text=True, check=True)
    assert "kernels" not in result.stderr + result.stdout
    assert result.stdout.startswith("usage: bayeslora")
