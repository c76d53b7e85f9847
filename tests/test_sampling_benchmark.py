"""The sampling benchmark's prediction-only part (benchmarks/sampling.py --prediction-only): a run with its
posterior in every layer, evaluated with --sample-layers last:K for every K against its own evaluation."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import sampling
from _shared import PREDICTION_FORMAT
from _toy_models import train_toy, write_word_task


def test_prediction_only_compares_each_k_with_sampling_every_layer(tiny_llama_dir, toy_task, tmp_path, monkeypatch):
    import bayeslora as bl

    monkeypatch.setattr(sampling, "SPECS", ("last:0", "all"))
    run = train_toy(tiny_llama_dir, toy_task, tmp_path / "run", method="melora", samples=3)
    other = write_word_task(tmp_path / "other.jsonl", 6)  # evaluated out of distribution too
    bl.evaluate(run, ood_tasks=[str(other)], overwrite=True, progress=False)
    rows = sampling.prediction_only([run], tmp_path / "evaluations")
    assert [row["sample_layers"] for row in rows] == ["last:0", "all"]
    assert all(set(row["ood"]) == {str(other)} and 0 <= row["ood"][str(other)]["auroc_entropy"] <= 1 for row in rows)
    own = json.loads((run / "eval" / "toy" / "metrics.json").read_text())
    everywhere = rows[-1]
    assert everywhere["nll"] == own["nll"] and everywhere["minus_all"]["nll"]["difference"] == 0
    head = json.loads((tmp_path / "evaluations" / "run" / "last0" / "eval" / "toy" / "metrics.json").read_text())
    assert head["sample_layers"] == "last:0" and head["n_samples"] == own["n_samples"] == 3
    assert rows[0]["nll"] == head["nll"]
    assert rows[0]["minus_all"]["nll"]["difference"] == pytest.approx(head["nll"] - own["nll"], abs=1e-6)
    text = sampling.prediction_only_section(rows)
    assert sum(line.startswith(f"| {own['task']} |") for line in text) == 4  # the metrics and the AUROC tables

    def no_new_evaluation(*args, **kwargs):
        raise AssertionError("an existing evaluation is reused")

    monkeypatch.setattr(bl, "evaluate", no_new_evaluation)
    assert sampling.prediction_only([run], tmp_path / "evaluations") == rows
    top = tmp_path / "top"  # the same run as if trained with its posterior in the top block only
    shutil.copytree(run, top)
    config = (top / "config.yaml").read_text()
    assert "bayesian_layers: all" in config
    (top / "config.yaml").write_text(config.replace("bayesian_layers: all", "bayesian_layers: last:1"))
    with pytest.raises(ValueError, match="posterior in every layer"):
        sampling.prediction_only([top], tmp_path / "evaluations")


def test_the_quality_table_reads_runs_and_stored_records_with_their_out_of_distribution_rows(tmp_path):
    """--quality tabulates the calibration runs on this machine and, for runs that are not, their stored records;
    the OOD rows come from the record's ``ood`` entry."""
    from _shared import resolved_options
    from bayeslora.io import write_json_atomic

    def record(seed: int, accuracy: float) -> dict:
        metrics = {"accuracy": accuracy, "ece": 0.1, "nll": 1.0, "brier": 0.5}
        ood = {"arc-challenge": {**metrics, "auroc_entropy": 0.6, "auroc_mutual_information": 0.7}}
        return {"seed": seed, "final": metrics, "ood": ood, "eval_time_s": 3.0, "step_time_s": 1.0}

    root, store = tmp_path / "runs", tmp_path / "records"
    write_json_atomic(root / "obqa-melora-last1-seed1" / "benchmark.json", record(1, 0.4))
    write_json_atomic(store / "obqa-melora-last1-seed1.json", record(1, 0.1))  # the run on this machine wins
    write_json_atomic(store / "obqa-melora-last1-seed2.json", record(2, 0.5))
    write_json_atomic(store / "obqa-melora-last2-seed1.json", record(1, 0.3))
    options = {"task": "obqa", "method": "melora", "seed": 3, "bayesian_layers": "last:2"}
    current = {"run_options": options, "run_config": resolved_options(options)}
    write_json_atomic(store / "obqa-melora-last2-seed3.json", {**record(3, 0.35), **current})
    stale = {**current, "run_config": {**current["run_config"], "sigma_init": 0.5}}  # a default changed since
    write_json_atomic(store / "obqa-melora-last4-seed1.json", {**record(1, 0.2), **stale})
    rows = sampling.quality(root, store, ["obqa"])
    assert [(r["bayesian_layers"], r["seed"], r["accuracy"]) for r in rows] == [
        ("last:1", 1, 0.4),
        ("last:1", 2, 0.5),
        ("last:2", 1, 0.3),
        ("last:2", 3, 0.35),
    ]  # not the stale last:4 record
    assert rows[0]["ood"]["arc-challenge"]["auroc_mutual_information"] == 0.7


def test_the_quality_table_compares_each_k_with_the_every_layer_run_question_by_question(tmp_path):
    """The `all` row comes from the evidence benchmark's run (not trained twice); every other row of the same task
    and seed gets its paired intervals against it, and its held-out NLL (what the choice of K is made on)."""
    import torch

    from bayeslora.evaluation.significance import compare
    from bayeslora.io import write_json_atomic

    labels = [0, 1, 1, 0]

    def record(probs: list[list[float]], heldout_nll: float) -> dict:
        metrics = {"accuracy": 0.5, "ece": 0.1, "nll": 1.0, "brier": 0.5}
        heldout = {"accuracy": 0.5, "ece": 0.1, "nll": heldout_nll}
        kept = {"format": PREDICTION_FORMAT, "probs": probs, "labels": labels}
        return {"seed": 1, "final": metrics, "heldout": heldout, "predictions": kept}

    head = [[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.6, 0.4]]
    every = [[0.6, 0.4], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]
    write_json_atomic(tmp_path / "records" / "arc-easy-melora-last0-seed1.json", record(head, 0.8))
    write_json_atomic(tmp_path / "evidence" / "arc-easy-melora-free-slr0.05-seed1.json", record(every, 0.9))
    rows = sampling.quality(
        tmp_path / "runs", tmp_path / "records", ["arc-easy"],
        every_layer=(tmp_path / "no-runs", tmp_path / "evidence", "melora-free-slr0.05"),
    )  # fmt: skip
    assert [(r["bayesian_layers"], r["heldout"]["nll"]) for r in rows] == [("last:0", 0.8), ("all", 0.9)]
    expected = compare(torch.tensor(head), torch.tensor(every), torch.tensor(labels))["nll"]
    assert rows[0]["minus_all"]["nll"]["difference"] == pytest.approx(expected.difference)
    assert rows[0]["minus_all"]["nll"]["difference"] < 0  # the head-only run is the sharper, right one here
    assert rows[1]["minus_all"]["nll"]["difference"] == 0
    assert "predictions" not in rows[0]
    timing = {"eval_questions": 16, "samples": 10, "base_dtype": "bfloat16", "rounds": 1, "rows": []}
    text = sampling.markdown(timing, rows)
    assert "| arc-easy | lm_head only | 1 | 0.800 |" in text and "| arc-easy | all blocks | 1 | 0.900 |" in text


def test_the_quality_table_gives_no_nll_interval_against_a_record_whose_kept_probabilities_are_lossy(tmp_path):
    """An every-layer record kept in the old 6-decimal format, with an answer of probability below 5e-7 stored as 0,
    does not reproduce its NLL: the paired NLL against it (which would be log(1e-300)-sized) is left out, the
    accuracy and ECE intervals stay; an old-format record that does reproduce its NLL keeps its NLL interval."""
    import torch

    from bayeslora.evaluation.metrics import negative_log_likelihood
    from bayeslora.io import write_json_atomic

    labels = [0, 1, 1, 0]
    head = [[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.6, 0.4]]
    rounded = [[0.6, 0.4], [1.0, 0.0], [0.5, 0.5], [0.5, 0.5]]  # question 2's answer had probability 3e-7

    def record(probs: list[list[float]], nll: float, exact: bool) -> dict:
        metrics = {"accuracy": 0.5, "ece": 0.1, "nll": nll, "brier": 0.5}
        kept = {"probs": probs, "labels": labels, **({"format": PREDICTION_FORMAT} if exact else {})}
        return {"seed": 1, "final": metrics, "predictions": kept}

    def nll_of(probs: list[list[float]]) -> float:
        return float(negative_log_likelihood(torch.tensor(probs, dtype=torch.float64), torch.tensor(labels)))

    true_nll = (-torch.tensor([0.6, 3e-7, 0.5, 0.5], dtype=torch.float64).log().mean()).item()
    for every, nll, lossy in ((rounded, true_nll, True), (head, nll_of(head), False)):
        write_json_atomic(tmp_path / "records" / "arc-easy-melora-last0-seed1.json", record(head, nll_of(head), True))
        write_json_atomic(tmp_path / "evidence" / "arc-easy-every-seed1.json", record(every, nll, exact=False))
        rows = sampling.quality(
            tmp_path / "runs", tmp_path / "records", ["arc-easy"],
            every_layer=(tmp_path / "no-runs", tmp_path / "evidence", "every"),
        )  # fmt: skip
        differences = rows[0]["minus_all"]
        assert {"accuracy", "ece"} <= set(differences) and ("nll" not in differences) == lossy
        timing = {"eval_questions": 16, "samples": 10, "base_dtype": "bfloat16", "rounds": 1, "rows": []}
        assert ("– (kept probabilities lossy)" in sampling.markdown(timing, rows)) == lossy
