"""Every method on a base loaded in 4 or 8 bits (bitsandbytes on the CPU), QLoRA style: the packaged SmolLM2
cut to two layers."""

from __future__ import annotations

import json

import pytest

import bayeslora as bl


@pytest.mark.parametrize(
    ("method", "bits"), [("lora", "4bit"), ("melora", "4bit"), ("blob", "8bit"), ("blora", "4bit")]
)
def test_methods_train_and_evaluate_on_a_quantized_base(method, bits, tmp_path):
    run = bl.train(
        model="smollm2-135m",
        task="arc-easy",
        method=method,
        num_layers=2,
        rank=2,
        max_steps=2,
        batch_size=2,
        train_size=4,
        limit=4,
        samples=2,
        lr=1e-3,
        output_dir=str(tmp_path / "run"),
        progress=False,
        **{f"load_in_{bits}": True},
    )
    metrics = json.loads((run / "eval" / "arc-easy" / "metrics.json").read_text())
    assert metrics["n_examples"] == 4 and 0 <= metrics["accuracy"] <= 1
    again = bl.evaluate(run, output_dir=tmp_path / "again", progress=False)  # reloads the base in the same bits
    if method == "lora":
        assert again["nll"] == pytest.approx(metrics["nll"], abs=1e-5)


def test_quantized_base_refuses_merging_and_base_quantization(tmp_path):
    model, _ = bl.load_model("smollm2-135m", num_layers=1, quantization="4bit", progress=False)
    from peft import get_peft_model

    peft_model = get_peft_model(model, bl.MeLoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="quantized base weight"):
        peft_model.merge_adapter()
    with pytest.raises(ValueError, match="already quantized"):
        bl.make_config(method="blora", quantize_base=True, load_in_4bit=True)
