"""Reliability: adapters on the wrong base, damaged files, non-finite training, extreme parameters, determinism."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bayeslora as bl
from _toy_models import write_word_task
from bayeslora.config import RunConfig
from bayeslora.io import read_yaml, write_yaml_atomic
from bayeslora.runs.adapters import AdapterFileError
from bayeslora.runs.fingerprint import FINGERPRINT_FILE, AdapterMismatchError
from bayeslora.training import NonFiniteLossError
from bayeslora.tuners.base import gaussian_kl, positive
from bayeslora.tuners.blora.gates import deterministic_gates, nested_expected_cost, prob_nonzero, sample_gates


@pytest.fixture()
def toy_task(tmp_path):
    """Twelve questions: eight to train on, the others held out."""
    return write_word_task(tmp_path / "toy.jsonl", 12)


def train_toy(model_dir, task, out, **options):
    settings_ = dict(model=str(model_dir), task=str(task), eval_tasks=[str(task)], rank=2, max_steps=2,
                     batch_size=4, lr=1e-2, train_size=8, limit=6, output_dir=str(out), progress=False)  # fmt: skip
    return bl.train(**{**settings_, **options})


@pytest.fixture()
def finished_run(tiny_llama_dir, toy_task, tmp_path):
    return train_toy(tiny_llama_dir, toy_task, tmp_path / "run")


@pytest.fixture()
def other_llama_dir(tmp_path, smol_tokenizer, tiny_llama_dir):
    """The tiny Llama's twin: same configuration and shapes, other weights."""
    from transformers import AutoConfig, LlamaForCausalLM

    torch.manual_seed(123)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(tiny_llama_dir))
    model.save_pretrained(tmp_path / "other")
    smol_tokenizer.save_pretrained(tmp_path / "other")
    return tmp_path / "other"


# --- adapter and base model -------------------------------------------------------------------------------------


def test_adapter_records_its_base_and_refuses_another(finished_run, other_llama_dir, tmp_path):
    fingerprint = json.loads((finished_run / "adapter" / FINGERPRINT_FILE).read_text())
    assert fingerprint["architecture"] == "LlamaForCausalLM" and fingerprint["config"]["num_hidden_layers"] == 2

    with pytest.raises(AdapterMismatchError, match=r"num_hidden_layers: 2 \(adapter's base\) vs 1 \(this base\)"):
        bl.evaluate(finished_run, num_layers=1, output_dir=tmp_path / "cut", progress=False)
    assert not (tmp_path / "cut").exists()

    twin = tmp_path / "twin-run"  # the run, its config pointing to the twin base
    twin.mkdir()
    stored = read_yaml(finished_run / "config.yaml")
    write_yaml_atomic(twin / "config.yaml", {**stored, "model": str(other_llama_dir)})
    (twin / "adapter").symlink_to(finished_run / "adapter")
    with pytest.raises(AdapterMismatchError, match="different weights") as error:
        bl.evaluate(twin, output_dir=tmp_path / "twin-eval", progress=False)
    assert str(other_llama_dir) in str(error.value) and "--force-base" in str(error.value)
    forced = bl.evaluate(twin, force_base=True, output_dir=tmp_path / "twin-eval", progress=False)
    assert 0.0 <= forced["accuracy"] <= 1.0


@pytest.mark.parametrize("legacy", [False, True])
def test_an_adapter_loads_onto_its_base_in_another_precision(tiny_llama_dir, legacy):
    """A run trained on a bf16 base (what dtype=auto picks on CPUs with bf16 units) evaluates on the same base loaded
    in float32 and back; a fingerprint of an earlier version (its hash as loaded only) too."""
    from peft import get_peft_model

    from bayeslora.runs.fingerprint import base_fingerprint, check_fingerprint

    half, _ = bl.load_model(str(tiny_llama_dir), dtype="bfloat16", device="cpu")
    full, _ = bl.load_model(str(tiny_llama_dir), dtype="float32", device="cpu")
    for trained, other in ((half, full), (full, half)):
        stored = base_fingerprint(get_peft_model(trained, bl.MeLoraConfig(r=2, target_modules=["q_proj"])))
        if legacy:
            del stored["embedding_sha256_bf16"]
        folder = tiny_llama_dir.parent / f"fingerprint-{legacy}-{trained.dtype}"
        folder.mkdir(exist_ok=True)
        (folder / FINGERPRINT_FILE).write_text(json.dumps(stored))
        if legacy and trained is full:  # an old fp32 hash cannot be recomputed from bf16 weights
            with pytest.raises(AdapterMismatchError, match="different weights"):
                check_fingerprint(other, folder)
            continue
        check_fingerprint(other, folder)  # no error
        stored["embedding_sha256_bf16" if not legacy else "embedding_sha256"] = "0" * 64  # other weights
        (folder / FINGERPRINT_FILE).write_text(json.dumps(stored))
        with pytest.raises(AdapterMismatchError, match="different weights"):
            check_fingerprint(other, folder)


def test_adapter_without_fingerprint_loads(finished_run, tmp_path):
    """Adapters written by PEFT itself carry no fingerprint: they load as before."""
    (finished_run / "adapter" / FINGERPRINT_FILE).unlink()
    metrics = bl.evaluate(finished_run, output_dir=tmp_path / "again", progress=False)
    expected = json.loads((finished_run / "eval" / "toy" / "metrics.json").read_text())
    assert metrics["accuracy"] == expected["accuracy"] and metrics["nll"] == pytest.approx(expected["nll"])


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_adapter_file_is_named(finished_run, tmp_path, damage):
    weights = finished_run / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 8 + data[8:])
    with pytest.raises(AdapterFileError, match=r"adapter.* is truncated or corrupt.*train the run again"):
        bl.evaluate(finished_run, output_dir=tmp_path / "e", progress=False)


def test_damaged_adapter_config_is_named(finished_run, tmp_path):
    (finished_run / "adapter" / "adapter_config.json").write_text('{"r": 2, ')
    with pytest.raises(AdapterFileError, match="truncated or corrupt"):
        bl.evaluate(finished_run, output_dir=tmp_path / "e", progress=False)


def test_cli_names_the_mismatch_without_a_traceback(finished_run, tmp_path, capsys):
    from bayeslora.cli import main

    code = main(["--quiet", "eval", "--run", str(finished_run), "--num-layers", "1", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != 0 and "was trained on" in err and "Traceback" not in err


# --- non-finite training ------------------------------------------------------------------------------------------


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tiny_llama_dir, toy_task, tmp_path):
    from transformers import TrainerCallback

    class Poison(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))

    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"at step 3 \(non-finite term\(s\): nll\).*Lower --lr"):
        train_toy(tiny_llama_dir, toy_task, out, max_steps=6, save_steps=1, save_total_limit=2, callbacks=[Poison()])
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-3"]
    from safetensors.torch import load_file

    good = load_file(str(out / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in good.values())
    assert not (out / "adapter").exists()  # nothing half-trained is presented as a result


@pytest.mark.parametrize("kind", ["softplus", "exp", "square"])
@pytest.mark.parametrize("raw", [-1e4, -80.0, 0.0, 80.0, 1e4])
def test_sigma_parameterisations_stay_finite_at_extremes(kind, raw):
    rho = torch.full((3, 3), raw, requires_grad=True)
    std = positive(rho, kind)
    assert torch.isfinite(std).all() and (std > 0).all()
    kl = gaussian_kl(torch.zeros(3, 3), std, 0.0, 0.1)
    assert torch.isfinite(kl)
    kl.backward()
    assert torch.isfinite(rho.grad).all()


@pytest.mark.parametrize("log_alpha", [-1e4, -30.0, 0.0, 30.0, 1e4])
def test_gates_stay_finite_at_extremes(log_alpha):
    logits = torch.full((2, 5), log_alpha, requires_grad=True)
    torch.manual_seed(0)
    gates = sample_gates(logits)
    cost = nested_expected_cost(logits, torch.arange(1.0, 6.0))
    assert torch.isfinite(gates).all() and ((gates >= 0) & (gates <= 1)).all()
    assert torch.isfinite(cost).all() and torch.isfinite(prob_nonzero(logits)).all()
    (gates.sum() + cost.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert deterministic_gates(logits).eq(1.0 if log_alpha >= 0 else 0.0).all()  # P(z = 0) = 0.17 at log α = 0


# --- option validation ----------------------------------------------------------------------------------------------

NUMERIC_OPTIONS = {
    "rank": st.integers(-5, 64),
    "alpha": st.floats(-10, 100, allow_nan=False),
    "lr": st.floats(-1, 1, allow_nan=False),
    "batch_size": st.integers(-2, 64),
    "epochs": st.floats(-1, 10, allow_nan=False),
    "warmup_ratio": st.floats(-1, 2, allow_nan=False),
    "dropout": st.none() | st.floats(-1, 2, allow_nan=False),
    "samples": st.none() | st.integers(-3, 20),
    "save_steps": st.none() | st.integers(-3, 20),
    "train_size": st.none() | st.integers(-3, 20),
}


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({}, optional=NUMERIC_OPTIONS))
def test_validation_accepts_exactly_the_valid_options_and_names_the_others(options):
    """Every out-of-range option is named in one ValueError; valid combinations pass."""
    invalid = {
        name
        for name, value in options.items()
        if value is not None
        and (
            (name in ("rank", "batch_size", "save_steps", "train_size") and value <= 0)
            or (name in ("alpha", "lr", "epochs") and value <= 0)
            or (name == "warmup_ratio" and not 0 <= value < 1)
            or (name == "dropout" and not 0 <= value < 1)
            or (name == "samples" and value < 0)
        )
    }
    config = RunConfig(**options)
    if not invalid:
        config.validate()
        return
    with pytest.raises(ValueError) as error:
        config.validate()
    for name in invalid:
        assert f"--{name.replace('_', '-')}" in str(error.value)


# --- determinism ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "map", "mcdropout", "ensemble", "laplace", "melora", "blob", "blora"])
def test_same_seed_same_metrics(method, tiny_llama_dir, toy_task, tmp_path):
    """Training and (sampled) evaluation repeat exactly with the same seed."""
    extra = {"ensemble_size": 2} if method == "ensemble" else {}
    if method in ("mcdropout", "melora", "blob", "blora"):
        extra["samples"] = 3
    runs = [train_toy(tiny_llama_dir, toy_task, tmp_path / f"r{k}", method=method, **extra) for k in range(2)]
    first, second = (json.loads((run / "eval" / "toy" / "metrics.json").read_text()) for run in runs)
    for key in ("accuracy", "ece", "nll", "brier"):
        assert first[key] == second[key], key
    again = bl.evaluate(runs[0], output_dir=tmp_path / "again", progress=False)  # a sampled evaluation, repeated
    assert again["nll"] == first["nll"]
