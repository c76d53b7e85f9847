"""``bayeslora predict`` on rows without answers and ``bayeslora generate`` on free-text prompts, from a trained run;
generation with the packaged SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model

import bayeslora as bl
from _toy_models import train_toy
from bayeslora.cli import main
from bayeslora.evaluation import EXAMPLES_FILE


@pytest.fixture()
def melora_run(tiny_llama_dir, toy_task, tmp_path):
    return train_toy(tiny_llama_dir, toy_task, tmp_path / "melora", method="melora", samples=4)


def _unlabelled(toy_task, path):
    rows = [json.loads(line) for line in toy_task.read_text().splitlines()]
    for i, row in enumerate(rows):
        del row["answer"]
        if i % 2:
            row["id"] = f"q{i}"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def test_predict_on_unlabelled_rows_matches_the_evaluation_of_the_same_rows(melora_run, toy_task, tmp_path, capsys):
    rows = _unlabelled(toy_task, tmp_path / "unlabelled.jsonl")
    out = tmp_path / "predictions.jsonl"
    code = main(["--quiet", "predict", "--run", str(melora_run), "--input", str(tmp_path / "unlabelled.jsonl"),
                 "--output", str(out)])  # fmt: skip
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [row.get("id", i + 1) for i, row in enumerate(rows)]
    evaluated = [json.loads(line) for line in (melora_run / "eval" / "toy" / EXAMPLES_FILE).read_text().splitlines()]
    assert len(evaluated) == len(records)
    for record, reference in zip(records, evaluated, strict=True):
        assert "label" not in record and reference["label"] in (0, 1)
        assert record["probs"] == pytest.approx(reference["probs"], abs=1e-6)  # same samples, same order
        assert sum(record["probs"]) == pytest.approx(1.0, abs=1e-5)
        assert record["prediction"] == max(range(2), key=lambda c: record["probs"][c])
        assert record["confidence"] == pytest.approx(max(record["probs"]), abs=1e-6)
        assert record["entropy"] == pytest.approx(record["expected_entropy"] + record["mutual_information"])
    assert any(r["mutual_information"] > 0 for r in records)  # 4 posterior samples disagree a little
    assert main(["--quiet", "predict", "--run", str(melora_run), "--input", str(toy_task), "--output", str(out)]) == 2
    assert "exists" in capsys.readouterr().err  # the earlier predictions are kept


def test_predict_in_python_reports_labels_where_rows_have_them(melora_run, toy_task):
    rows = [json.loads(line) for line in toy_task.read_text().splitlines()][:3]
    del rows[1]["answer"]
    records = bl.predict_inputs(melora_run, rows, samples=0, progress=False)
    assert [r["id"] for r in records] == [1, 2, 3]
    assert "label" in records[0] and "label" not in records[1] and records[2]["correct"] in (True, False)
    assert all(r["mutual_information"] == 0 for r in records)  # the posterior mean: nothing to disagree
    with pytest.raises(ValueError, match="classification"):
        bl.predict_inputs(melora_run, [{"text": "a sentence"}], progress=False)


def test_generate_cli_writes_one_record_per_prompt(melora_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "chat", "messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    code = main(["--quiet", "generate", "--run", str(melora_run), "--prompt", "Item 3: pick", "--input", str(prompts),
                 "--samples", "3", "--max-new-tokens", "4"])  # fmt: skip
    assert code == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in records] == [1, "chat"]
    for record in records:
        assert record["samples"] == 3 and len(record["answers"]) == 3
        assert 0 < record["agreement"] <= 1 and record["answer_entropy"] >= 0
        assert all(a["tokens"] <= 4 and a["log_likelihood"] <= 0 for a in record["answers"])
    assert main(["--quiet", "generate", "--run", str(melora_run)]) == 2
    assert "--prompt" in capsys.readouterr().err


def test_generate_with_the_packaged_smollm2():
    model, tokenizer = bl.load_model("smollm2-135m", num_layers=4, dtype="float32")
    model = get_peft_model(model, bl.MeLoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    torch.manual_seed(0)
    results = bl.generate(
        model, tokenizer, ["The capital of France is"], samples=2, max_new_tokens=5, chat_template=True
    )
    assert len(results[0].answers) == 2
    assert all(a.tokens >= 1 and a.log_likelihood < 0 for a in results[0].answers)
    # an untrained adapter (B = 0) is the base model: every sample answers alike
    assert results[0].agreement == 1.0 and results[0].distinct == 1


PREDICTIVES = [("ensemble", {"ensemble_size": 2}, 2), ("mcdropout", {"dropout": 0.3, "samples": 3}, 3)]


@pytest.mark.parametrize(("method", "options", "answers"), PREDICTIVES)
def test_ensembles_and_mc_dropout_answer_once_per_member_or_mask(
    method, options, answers, tiny_llama_dir, toy_task, tmp_path
):
    run = train_toy(tiny_llama_dir, toy_task, tmp_path / method, method=method, **options)
    records = bl.generate_answers(run, ["Item 1: pick"], max_new_tokens=3, progress=False)
    assert records[0]["samples"] == answers and len(records[0]["answers"]) == answers


def test_predict_and_generate_can_sample_the_top_blocks_only(melora_run, toy_task, tmp_path, monkeypatch, capsys):
    """``--sample-layers last:1`` reaches the prediction of ``bayeslora predict`` and ``generate`` (the layers below
    the top block predict with their posterior mean while they run); a malformed value is refused."""
    import importlib

    import bayeslora.tuners.trunk as trunk

    asked: list[tuple[str, list[bool]]] = []

    def spy(model, spec="all"):
        """Record the spec and which layers sample inside the block."""
        context = trunk.sampled_layers(model, spec)

        class Recording:
            def __enter__(self):
                context.__enter__()
                layers = [m for m in model.modules() if isinstance(m, trunk.BayesianLowRankLayer)]
                flags = [flag for layer in layers for flag in layer.stochastic.values()]
                asked.append((spec, flags))

            def __exit__(self, *exc):
                return context.__exit__(*exc)

        return Recording()

    for name in ("bayeslora.evaluation.predictive", "bayeslora.pipeline.generate"):
        monkeypatch.setattr(importlib.import_module(name), "sampled_layers", spy)
    rows = tmp_path / "rows.jsonl"
    _unlabelled(toy_task, rows)
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--run", str(melora_run), "--input", str(rows), "--output", str(out), "--samples", "2",
                 "--sample-layers", "last:1"]) == 0  # fmt: skip
    assert main(["generate", "--run", str(melora_run), "--prompt", "Item 1: pick", "--samples", "2",
                 "--max-new-tokens", "2", "--sample-layers", "last:1"]) == 0  # fmt: skip
    assert [spec for spec, _ in asked] == ["last:1", "last:1"]
    for _, flags in asked:  # the tiny Llama's 2 blocks: block 0's q and v stop sampling, block 1's and the head's not
        assert flags.count(False) == 2 and flags.count(True) == len(flags) - 2
    with pytest.raises(ValueError, match="--sample-layers must be 'all' or 'last:K'"):
        bl.generate_answers(melora_run, ["Item 1"], sample_layers="top:1", progress=False)
