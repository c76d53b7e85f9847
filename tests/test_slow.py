"""Slow: the full packaged SmolLM2 really learns (`make test-slow`)."""

from __future__ import annotations

import pytest

import bayeslora as bl
from bayeslora.io import read_json


@pytest.mark.slow
def test_full_smollm2_beats_zero_shot_on_arc_easy(tmp_path):
    zero_shot = bl.evaluate(
        model="smollm2-135m", task="arc-easy", limit=150, output_dir=tmp_path / "zs", progress=False
    )
    run = bl.train(
        model="smollm2-135m",
        task="arc-easy",
        max_steps=60,
        batch_size=4,
        lr=1e-3,
        limit=150,
        output_dir=str(tmp_path / "lora"),
        progress=False,
    )
    tuned = read_json(run / "eval" / "arc-easy" / "metrics.json")
    assert tuned["accuracy"] > zero_shot["accuracy"] + 0.05
    assert tuned["nll"] < zero_shot["nll"]
