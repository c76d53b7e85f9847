"""The demo's orchestration, on the packaged SmolLM2 cut to two layers and a few steps (the real demo is
``make demo``; its timing and results are recorded in the README)."""

from __future__ import annotations

import pytest

from bayeslora.pipeline import demo


def test_demo_trains_every_method_and_prints_one_table(tmp_path, monkeypatch, capsys):
    small = {**demo.DEMO_RECIPE, "num_layers": 2, "train_size": 8, "max_steps": 2, "batch_size": 2, "limit": 6}
    monkeypatch.setattr(demo, "DEMO_RECIPE", small)
    monkeypatch.setattr(demo, "DEMO_METHODS", {**demo.DEMO_METHODS, "blob": {"samples": 2}, "melora": {"samples": 2}})
    rows = demo.run_demo(tmp_path / "demo", progress=False)
    assert [row["method"] for row in rows] == ["zero-shot", "lora", "blob", "melora"]
    assert [row["n_samples"] for row in rows] == [1, 1, 2, 2]
    assert all(row["n_examples"] == 6 for row in rows)
    assert all(row["trainable_params"] > 0 and row["step_memory_mb"] > 0 for row in rows[1:])
    assert (tmp_path / "demo" / "reliability.png").stat().st_size > 0
    printed = capsys.readouterr().out
    for method in ("zero-shot", "lora", "blob", "melora"):
        assert f"| arc-easy | {method} |" in printed
        assert f"| arc-easy | {method} | mmlu:college_physics |" in printed  # the out-of-distribution table
    assert all(set(row["ood"]) == {"mmlu:college_physics"} for row in rows)
    assert rows[1]["ood"]["mmlu:college_physics"]["auroc_mutual_information"] == 0.5  # LoRA: no posterior
    assert rows[3]["ood"]["mmlu:college_physics"]["auroc_mutual_information"] != 0.5  # Me-LoRA's has samples


@pytest.mark.parametrize("method", list(demo.DEMO_METHODS))
def test_shipped_demo_recipes_match_the_demo(method):
    from pathlib import Path

    from bayeslora.config import load_recipe

    recipe = Path(__file__).resolve().parents[1] / "configs" / method / "smollm2-135m-arc-easy.yaml"
    assert load_recipe(recipe) == demo.demo_recipe(method)
