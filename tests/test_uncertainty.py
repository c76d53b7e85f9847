"""Uncertainty out of distribution and selective prediction: entropies against torch.distributions, the AUROC
against a brute-force Mann-Whitney count, the risk-coverage curve by hand; `eval --ood-tasks` end to end; early
stopping keeps the best held-out epoch."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch.distributions import Categorical

import bayeslora as bl
from _toy_models import write_word_task
from bayeslora.cli import main
from bayeslora.evaluation.predictive import Prediction
from bayeslora.evaluation.uncertainty import ood_auroc, risk_coverage, selective_prediction, uncertainty
from bayeslora.training import early_stopping


def test_entropies_match_torch_distributions_and_mutual_information_is_their_difference():
    generator = torch.Generator().manual_seed(0)
    sample_probs = torch.rand(6, 10, 4, generator=generator).softmax(-1)  # (S, N, C)
    probs = sample_probs.mean(0)
    found = uncertainty(probs, sample_probs)
    torch.testing.assert_close(found["entropy"], Categorical(probs=probs.double()).entropy())
    expected = Categorical(probs=sample_probs.double()).entropy().mean(0)
    torch.testing.assert_close(found["expected_entropy"], expected)
    torch.testing.assert_close(found["mutual_information"], found["entropy"] - expected)
    assert (found["mutual_information"] >= 0).all()
    alone = uncertainty(probs)  # a deterministic model: no disagreement between samples
    assert torch.equal(alone["mutual_information"], torch.zeros(10, dtype=torch.float64))


def test_auroc_is_the_mann_whitney_probability_of_ranking_an_ood_example_higher():
    generator = torch.Generator().manual_seed(1)
    inside, outside = torch.rand(30, generator=generator), torch.rand(20, generator=generator) + 0.3
    outside[:3] = inside[:3]  # ties count one half
    pairs = list(itertools.product(inside.tolist(), outside.tolist()))
    expected = sum((o > i) + 0.5 * (o == i) for i, o in pairs) / len(pairs)
    assert ood_auroc(inside, outside) == pytest.approx(expected, abs=1e-6)
    assert ood_auroc(torch.zeros(5), torch.zeros(4)) == 0.5  # no separation at all


def test_risk_coverage_and_its_summaries_by_hand():
    # confidences 0.9, 0.8, 0.7, 0.6 (already in order); the 2nd and 4th are wrong
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 1, 0])
    coverage, accuracy = risk_coverage(probs, labels)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert accuracy.tolist() == pytest.approx([1.0, 0.5, 2 / 3, 0.5])
    summary = selective_prediction(probs, labels)
    assert summary["aurc"] == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4)
    assert summary["accuracy_at_coverage"] == {"0.5": 0.5, "0.8": pytest.approx(2 / 3)}


def test_eval_with_ood_tasks_records_aurocs_and_each_tasks_own_metrics(tiny_llama_dir, tmp_path, capsys):
    task = write_word_task(tmp_path / "words.jsonl", 8)
    other = tmp_path / "colors.jsonl"
    other.write_text(
        "".join(
            json.dumps({"question": f"Colour {i}?", "choices": ["red", "blue", "green"], "answer": i % 3}) + "\n"
            for i in range(6)
        )
    )
    run = bl.train(model=str(tiny_llama_dir), task=str(task), eval_tasks=[], method="melora", rank=2, max_steps=2,
                   batch_size=4, samples=3, output_dir=str(tmp_path / "run"), progress=False)  # fmt: skip
    assert main(["--quiet", "eval", "--run", str(run), "--task", str(task), "--ood-tasks", str(other)]) == 0
    record = json.loads((run / "eval" / "words" / "metrics.json").read_text())
    scores = record["ood"][str(other)]  # a file task is named by its path
    assert 0 <= scores["auroc_entropy"] <= 1 and 0 <= scores["auroc_mutual_information"] <= 1
    assert (scores["n_in"], scores["n_out"]) == (8, 6)
    assert set(record["accuracy_at_coverage"]) == {"0.5", "0.8"} and 0 <= record["aurc"] <= 1
    assert record["mean_mutual_information"] > 0  # three posterior samples that disagree
    assert (run / "eval" / "colors" / "metrics.json").is_file()
    assert main(["report", str(run)]) == 0
    assert "## Out of distribution" in capsys.readouterr().out
    assert main(["--quiet", "eval", "--run", str(run), "--task", str(task), "--ood-tasks", str(other)]) == 2
    assert "already holds an evaluation" in capsys.readouterr().err  # nothing is overwritten unasked


def test_early_stopping_keeps_the_epoch_with_the_lowest_heldout_nll(monkeypatch):
    """The callback alone, with the held-out NLL of each epoch scripted: best epoch 2, patience 2 stops at 4."""
    nlls = iter([0.9, 0.5, 0.7, 0.8, 0.4])

    def scripted_predict(*args, **kwargs):
        p = torch.tensor([[float(torch.tensor(next(nlls)).neg().exp()), 0.0]])
        return Prediction(probs=p, labels=torch.tensor([0]))

    states = iter(range(10))
    monkeypatch.setattr(early_stopping, "predict", scripted_predict)
    monkeypatch.setattr(early_stopping, "_adapter_state", lambda model: {"w": torch.tensor(float(next(states)))})
    stopping = early_stopping.EarlyStopping(scorer=None, heldout=[object()], patience=2)

    class Control:
        should_training_stop = False

    class State:
        epoch, global_step = 0, 0

    model, control = torch.nn.Linear(1, 1), Control()
    for epoch in range(1, 5):
        State.epoch, State.global_step = epoch, 10 * epoch
        stopping.on_epoch_end(None, State, control, model=model)
        assert control.should_training_stop == (epoch == 4)
    assert stopping.best == {"epoch": 2, "step": 20, "heldout_nll": pytest.approx(0.5)}
    assert float(stopping.best_state["w"]) == 1.0  # the state kept at epoch 2 (the second one taken)
    assert stopping.record()["epochs_run"] == 4


def test_early_stopping_resumed_from_a_checkpoint_without_its_choice_says_so(tmp_path):
    """A checkpoint saved as its process was killed (by a version before the seal) lacks the history: warned."""
    checkpoint = tmp_path / "checkpoint-20"
    checkpoint.mkdir()
    with pytest.warns(UserWarning, match="early_stopping.json is missing"):
        stopping = early_stopping.EarlyStopping(scorer=None, heldout=[object()], checkpoint=checkpoint)
    assert stopping.history == []
    (checkpoint / early_stopping.HISTORY_FILE).write_text('{"history": [{"epoch": 1, "step": 10, "heldout_nll": 0.5}]}')
    assert early_stopping.EarlyStopping(scorer=None, heldout=[object()], checkpoint=checkpoint).best["step"] == 10


def test_a_run_with_early_stopping_saves_its_best_epoch(tiny_llama_dir, tmp_path):
    task = write_word_task(tmp_path / "words.jsonl", 16)
    run = bl.train(model=str(tiny_llama_dir), task=str(task), eval_tasks=[], rank=2, epochs=3, batch_size=4,
                   lr=5e-2, train_size=8, early_stopping=True, output_dir=str(tmp_path / "run"),
                   progress=False)  # fmt: skip
    chosen = json.loads((run / "train_summary.json").read_text())["early_stopping"]
    assert chosen["epochs_run"] == 3 and chosen["heldout_examples"] == 8
    assert chosen["heldout_nll"] == min(entry["heldout_nll"] for entry in chosen["history"])
    base, tokenizer = bl.load_model(str(tiny_llama_dir), dtype="float32", device="cpu")
    model = bl.load_adapter(base, run / "adapter")
    loaded = bl.load_task(str(task))
    heldout = bl.tasks.seeded_heldout(loaded.train, 8, 200, bl.tasks.DATA_SEED)
    scorer = bl.make_scorer(loaded, tokenizer, "cloze")
    prediction = bl.predict(model, scorer, heldout, progress=False)
    from bayeslora.evaluation.metrics import negative_log_likelihood

    assert negative_log_likelihood(prediction.probs, prediction.labels) == pytest.approx(
        chosen["heldout_nll"], abs=1e-4
    )
    with pytest.raises(ValueError, match="no held-out examples"):
        bl.train(model=str(tiny_llama_dir), task=str(task), eval_tasks=[], early_stopping=True, progress=False,
                 output_dir=str(tmp_path / "refused"))  # fmt: skip
