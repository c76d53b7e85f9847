"""Temperature scaling: never raises the held-out NLL it was fitted on, never changes accuracy."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bayeslora.evaluation.metrics import classification_metrics
from bayeslora.evaluation.temperature import fit_temperature, scaled


def nll(probs, labels):
    return float(F.nll_loss(probs.double().clamp_min(1e-300).log(), labels))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), sharpness=st.floats(0.2, 8.0), classes=st.integers(2, 5))
def test_fitted_temperature_never_raises_nll_and_keeps_accuracy(seed, sharpness, classes):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(60, classes, generator=generator) * sharpness
    labels = torch.randint(0, classes, (60,), generator=generator)
    probs = logits.softmax(-1)
    temperature = fit_temperature(probs, labels)
    after = scaled(probs, temperature)
    assert temperature > 0
    assert nll(after, labels) <= nll(probs, labels) + 1e-9
    assert torch.equal(after.argmax(-1), probs.argmax(-1))


def test_temperature_recovers_a_known_overconfidence():
    torch.manual_seed(0)
    true_logits = torch.randn(4000, 4)
    labels = torch.distributions.Categorical(logits=true_logits).sample()
    overconfident = (3.0 * true_logits).softmax(-1)  # the calibrated model sharpened 3x
    temperature = fit_temperature(overconfident, labels)
    assert abs(temperature - 3.0) < 0.25
    before = classification_metrics(overconfident, labels)
    after = classification_metrics(scaled(overconfident, temperature), labels)
    assert after["ece"] < before["ece"] / 2 and after["accuracy"] == before["accuracy"]


def test_the_fitted_temperature_is_the_minimiser():
    """Against a dense float64 grid of T: the bisection's NLL is at most the grid's best (T inside the bounds)."""
    torch.manual_seed(1)
    logits = torch.randn(400, 4) * 3
    logits[::3, 3] = -torch.inf  # questions with three choices
    labels = torch.distributions.Categorical(logits=logits / 1.7).sample()  # the model is 1.7x too sharp
    probs = logits.softmax(-1)
    temperature = fit_temperature(probs, labels)
    assert 1.2 < temperature < 2.5
    best = min(nll(scaled(probs, float(t)), labels) for t in torch.logspace(-2, 2, 4001, dtype=torch.float64))
    assert nll(scaled(probs, temperature), labels) <= best + 1e-12


def test_a_flat_nll_keeps_the_predictions():
    assert fit_temperature(torch.full((6, 3), 1 / 3), torch.tensor([0, 1, 2, 0, 1, 2])) == 1.0


def test_misleading_predictions_stop_at_the_largest_temperature():
    """Confident and always wrong, with missing choices: the NLL falls towards uniform; T stops at 100."""
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.05, 0.9, 0.05], [0.8, 0.2, 0.0]] * 5)
    labels = torch.tensor([1, 2, 1] * 5)
    temperature = fit_temperature(probs, labels)
    assert temperature == pytest.approx(100.0)
    assert nll(scaled(probs, temperature), labels) < nll(probs, labels)


def test_a_label_predicted_impossible_is_a_clear_error():
    with pytest.raises(FloatingPointError, match="probability 0"):
        fit_temperature(torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([1, 0]))


def test_missing_choices_stay_impossible():
    probs = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.5, 0.3]])
    out = scaled(probs, 2.0)
    assert out[0, 2] == 0 and torch.allclose(out.sum(-1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(out[1], (probs[1].double().log() / 2).softmax(-1))


def test_calibrate_a_run_end_to_end(tiny_llama_dir, tmp_path, capsys):
    import json

    from bayeslora.cli import main

    rows = [{"question": f"Item {i}: which word?", "choices": ["apple", "river"], "answer": i % 2} for i in range(24)]
    task = tmp_path / "toy.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    common = ["--model", str(tiny_llama_dir), "--task", str(task), "--eval-tasks", str(task), "--rank", "2"]
    assert main(["--quiet", "train", *common, "--max-steps", "6", "--batch-size", "4", "--lr", "1e-2",
                 "--train-size", "8", "--output-dir", str(run)]) == 0  # fmt: skip
    assert main(["--quiet", "calibrate", "--run", str(run), "--heldout", "12"]) == 0
    before = json.loads((run / "eval" / "toy" / "metrics.json").read_text())
    after = json.loads((run / "eval" / "toy-ts" / "metrics.json").read_text())
    assert after["method"] == "lora+ts" and after["temperature"] > 0 and after["temperature_examples"] == 12
    assert after["accuracy"] == before["accuracy"]
    assert (run / "eval" / "toy-ts" / "reliability.png").is_file()
    assert main(["--quiet", "calibrate", "--run", str(run)]) == 2  # exists: refused without --overwrite
    assert "already exist" in capsys.readouterr().err
    assert main(["report", str(run), "--output-dir", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"## {task}" in report and f"| {task} | lora |" in report and f"| {task} | lora+ts |" in report
    assert "train s" in report and "eval s" in report and "| task | method | seed |" in report
    assert len(list((tmp_path / "report").glob("reliability-*toy.png"))) == 1
    full = tmp_path / "full"
    assert main(["--quiet", "train", *common, "--max-steps", "2", "--output-dir", str(full)]) == 0
    assert main(["--quiet", "calibrate", "--run", str(full)]) == 2  # trained on everything: nothing held out
    assert "--train-size" in capsys.readouterr().err
    assert main(["--quiet", "calibrate", "--run", str(run), "--task", "toy-ts", "--overwrite"]) == 2
    assert "already temperature-scaled; calibrate its source: --task toy" in capsys.readouterr().err
    assert main(["--quiet", "calibrate", "--run", str(run), "--heldout", "0", "--overwrite"]) == 2
    assert "--heldout must be positive" in capsys.readouterr().err
    assert main(["--quiet", "eval", "--run", str(run), "--limit", "0", "--output-dir", str(tmp_path / "e")]) == 2
    assert "--limit must be positive" in capsys.readouterr().err
    (tmp_path / "not-a-run").mkdir()
    assert main(["report", str(tmp_path / "not-a-run")]) == 2
    assert "not a bayeslora run directory" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("keep me")
    assert main(["report", str(run), "--out", str(tmp_path / "a-file")]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "a-file").read_text() == "keep me"


@pytest.mark.parametrize(
    ("method", "options", "changed"),
    [
        ("melora", {"samples": 3, "factor_norm": "free", "prior_mean": "identity"}, {"samples": 0}),
        ("ensemble", {"ensemble_size": 2}, {"ensemble_combine": "logits"}),
    ],
)
def test_calibrate_fits_each_evaluation_as_it_was_predicted(tiny_llama_dir, tmp_path, method, options, changed):
    """An evaluation re-run another way (the posterior mean, ``--samples 0``; an ensemble's logits averaged)
    is rescaled by the T of held-out predictions made that way, not by the T of the run's default predictive."""
    import bayeslora as bl
    from bayeslora.evaluation import load_predictions
    from bayeslora.tasks import DATA_SEED, seeded_heldout

    rows = [{"question": f"Item {i}: which word?", "choices": ["apple", "river"], "answer": i % 2} for i in range(24)]
    task = tmp_path / "toy.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = bl.train(model=str(tiny_llama_dir), task=str(task), eval_tasks=[str(task)], method=method, rank=2,
                   max_steps=6, batch_size=4, lr=1e-2, train_size=8, output_dir=str(tmp_path / "run"),
                   progress=False, **options)  # fmt: skip
    (default,) = bl.calibrate(run, heldout=12, progress=False)
    evaluation = bl.evaluate(run, overwrite=True, progress=False, **changed)  # eval/toy, predicted the other way
    assert all(evaluation[key] == value for key, value in changed.items() if key != "samples")  # recorded
    (rescaled,) = bl.calibrate(run, heldout=12, overwrite=True, progress=False)

    heldout = tmp_path / "heldout.jsonl"  # the same held-out questions, evaluated as a task of their own
    heldout.write_text("".join(json.dumps(r) + "\n" for r in seeded_heldout(rows, 8, 12, DATA_SEED)))
    bl.evaluate(run, task=str(heldout), output_dir=tmp_path / "reference", progress=False, **changed)
    reference = load_predictions(tmp_path / "reference" / "eval" / "heldout")
    assert rescaled["temperature"] == pytest.approx(fit_temperature(reference.probs, reference.labels), rel=1e-4)
    assert rescaled["temperature"] != pytest.approx(default["temperature"], rel=1e-4)


def test_calibrate_reuses_the_runs_own_heldout_evaluation(tiny_llama_dir, tmp_path, monkeypatch):
    """After ``bayeslora eval --heldout`` predicted the same held-out examples the same way, calibrate fits T on
    those saved predictions (no second pass: the same T as fitting afresh); an evaluation made another way (the
    posterior mean instead of 3 samples) is not reused."""
    import importlib

    import bayeslora as bl

    calibrate_module = importlib.import_module("bayeslora.pipeline.calibrate")

    rows = [{"question": f"Item {i}: which word?", "choices": ["apple", "river"], "answer": i % 2} for i in range(24)]
    task = tmp_path / "toy.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = bl.train(model=str(tiny_llama_dir), task=str(task), eval_tasks=[str(task)], method="melora", rank=2,
                   max_steps=6, batch_size=4, lr=1e-2, train_size=8, samples=3, output_dir=str(tmp_path / "run"),
                   progress=False)  # fmt: skip
    (fresh,) = bl.calibrate(run, heldout=12, progress=False)
    passes = []
    evaluate_model = calibrate_module.evaluate_model
    monkeypatch.setattr(calibrate_module, "evaluate_model", lambda *a, **k: passes.append(1) or evaluate_model(*a, **k))

    bl.evaluate(run, heldout=12, samples=0, progress=False)  # the posterior mean: not how eval/toy was predicted

    def calibrate_toy() -> dict:
        """The temperature-scaled record of eval/toy (calibrate rescales eval/toy-heldout too)."""
        (record,) = [r for r in bl.calibrate(run, heldout=12, overwrite=True, progress=False) if r["task"] == str(task)]
        return record

    other_way = calibrate_toy()
    assert len(passes) == 1 and other_way["temperature"] == pytest.approx(fresh["temperature"], rel=1e-6)

    bl.evaluate(run, heldout=12, overwrite=True, progress=False)  # 3 samples, as eval/toy
    loads = []
    load_base = calibrate_module.load_base
    monkeypatch.setattr(calibrate_module, "load_base", lambda *a, **k: loads.append(1) or load_base(*a, **k))
    reused = calibrate_toy()
    assert len(passes) == 1 and not loads  # no new pass, and no model loaded for it
    assert reused["temperature"] == pytest.approx(fresh["temperature"], rel=1e-6)

    bl.evaluate(run, heldout=10, overwrite=True, progress=False)  # other held-out examples: fitted afresh
    bl.calibrate(run, heldout=12, overwrite=True, progress=False)
    assert len(passes) == 2
    for option in ({"cloze_normalization": "sum"}, {"max_length": 64}):  # scored another way: fitted afresh
        bl.evaluate(run, heldout=12, overwrite=True, progress=False, **option)
        assert calibrate_toy()["temperature"] == pytest.approx(fresh["temperature"], rel=1e-6)
    assert len(passes) == 4
