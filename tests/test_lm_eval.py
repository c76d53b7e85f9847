"""lm-evaluation-harness on a bayeslora run, offline, with a local task over a JSON file: a LoRA run and Me-LoRA's
posterior mean equal lm-eval's own ``hf`` model with the exported adapter; posterior samples average probabilities."""

from __future__ import annotations

import json

import pytest

import bayeslora as bl
from _toy_models import train_toy

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from bayeslora.cli import main  # noqa: E402
from bayeslora.lm_eval import BayesLoraLM, local_multiple_choice_task  # noqa: E402


@pytest.fixture()
def task_dir(toy_task, tmp_path):
    folder = tmp_path / "lm-eval-tasks"
    folder.mkdir()
    (folder / "toy.yaml").write_text(local_multiple_choice_task("toy_mc", toy_task))
    return folder


def _loglikelihoods(model, task_dir) -> list[float]:
    out = lm_eval.simple_evaluate(
        model=model, tasks=["toy_mc"], task_manager=TaskManager(include_path=str(task_dir)), log_samples=True
    )
    return [resp[0][0] for doc in out["samples"]["toy_mc"] for resp in doc["resps"]]


@pytest.mark.parametrize("method", ["lora", "melora"])
def test_a_run_equals_lm_evals_hf_model_with_its_exported_adapter(method, tiny_llama_dir, toy_task, task_dir, tmp_path):
    # not lm_head: lm-eval's hf model re-ties the embeddings after loading, which fails on an adapted tied lm_head
    run = train_toy(tiny_llama_dir, toy_task, tmp_path / method, method=method, target_modules=["q_proj", "v_proj"])
    bl.export(run, "lora", tmp_path / f"{method}-lora", progress=False)  # Me-LoRA: the posterior mean
    ours = _loglikelihoods(BayesLoraLM(run=str(run), samples=0, batch_size=4), task_dir)
    reference = HFLM(pretrained=str(tiny_llama_dir), peft=str(tmp_path / f"{method}-lora"), batch_size=4, device="cpu")
    theirs = _loglikelihoods(reference, task_dir)
    assert len(ours) == 16 and ours == pytest.approx(theirs, abs=2e-4)


def test_posterior_samples_average_probabilities_and_the_cli_runs_lm_eval(tiny_llama_dir, toy_task, task_dir, tmp_path):
    run = train_toy(tiny_llama_dir, toy_task, tmp_path / "melora", method="melora")
    mean = _loglikelihoods(BayesLoraLM(run=str(run), samples=0, batch_size=4), task_dir)
    sampled = _loglikelihoods(BayesLoraLM(run=str(run), samples=3, batch_size=4), task_dir)
    again = _loglikelihoods(BayesLoraLM(run=str(run), samples=3, batch_size=4), task_dir)
    assert sampled == again  # the same posterior samples for the same run seed
    assert sampled != pytest.approx(mean, abs=1e-9)
    head = _loglikelihoods(BayesLoraLM(run=str(run), samples=3, batch_size=4, sample_layers="last:0"), task_dir)
    assert head != pytest.approx(sampled, abs=1e-9) and head != pytest.approx(mean, abs=1e-9)
    with pytest.warns(UserWarning, match="the same as sample_layers='all'"):  # both blocks: every layer sampled
        both = _loglikelihoods(BayesLoraLM(run=str(run), samples=3, batch_size=4, sample_layers="last:2"), task_dir)
    assert both == sampled
    out = tmp_path / "lm-eval-out"
    code = main(["--quiet", "lm-eval", "--model", "bayeslora", "--model_args", f"run={run},samples=0",
                 "--tasks", "toy_mc", "--include_path", str(task_dir), "--output_path", str(out),
                 "--batch_size", "4"])  # fmt: skip
    assert code == 0
    results = [json.loads(p.read_text()) for p in out.rglob("results*.json")]
    assert results and results[0]["results"]["toy_mc"]["acc,none"] == pytest.approx(
        sum(max(mean[2 * i : 2 * i + 2]) == mean[2 * i + a] for i, a in enumerate([1, 0] * 4)) / 8
    )
