"""AdaLoRA (PEFT's) through the Trainer: the budget allocation runs every step and prunes ranks; the
orthogonality term is added to the loss."""

from __future__ import annotations

import json

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model

import bayeslora as bl
from bayeslora.methods.adalora import AdaLoraOrthogonality


def test_adalora_prunes_ranks_to_its_budget(tiny_llama_dir, tmp_path):
    rows = [{"question": f"Item {i}: which word?", "choices": ["apple", "river"], "answer": i % 2} for i in range(8)]
    task = tmp_path / "toy.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = bl.train(
        model=str(tiny_llama_dir),
        task=str(task),
        eval_tasks=[str(task)],
        method="adalora",
        rank=2,
        max_steps=30,
        batch_size=4,
        lr=1e-2,
        logging_steps=5,
        output_dir=str(tmp_path / "run"),
        progress=False,
    )
    metrics = json.loads((run / "eval" / "toy" / "metrics.json").read_text())
    ranks = [layer["rank"] for layer in metrics["structure"].values()]
    assert max(ranks) <= 3 and sum(ranks) / len(ranks) <= 2.0 + 1e-9  # init_r 3 pruned to an average of 2
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert all(entry["orth_reg"] >= 0 for entry in log)
    assert (run / "structure.png").is_file()


def test_orthogonality_term_is_zero_for_orthonormal_factors(tiny_llama):
    base, _ = tiny_llama
    model = get_peft_model(base, AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"]))
    loss = AdaLoraOrthogonality()
    assert float(loss(model, None).terms["orth_reg"]) > 0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:  # P Pᵀ = I and Qᵀ Q = I
                parameter.copy_(torch.eye(*parameter.shape))
    assert float(loss(model, None).terms["orth_reg"]) < 1e-6


def test_a_layer_pruned_to_rank_zero_saves_quietly_and_loads_back(tiny_llama_dir, tmp_path):
    import warnings

    from peft import PeftModel

    from bayeslora.models import load_model
    from bayeslora.runs.adapters import save_adapter

    base, _ = load_model(str(tiny_llama_dir), dtype="float32", device="cpu")
    model = get_peft_model(base, AdaLoraConfig(init_r=2, target_r=1, total_step=10, target_modules=["q_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_()
    names = sorted(n for n, _ in model.base_model.model.named_parameters() if "lora_E" in n)  # PEFT's keys
    pattern = {name: [False, False] if i == 0 else [True, False] for i, name in enumerate(names)}  # layer 0: rank 0
    model.peft_config["default"].rank_pattern = pattern
    model.base_model.rankallocator.mask_using_rank_pattern(model.base_model.model, pattern)
    ids = torch.tensor([[1, 5, 9, 3]])
    model.eval()
    expected = model(input_ids=ids).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_adapter(model, tmp_path / "adapter")
    assert not [w for w in caught if "invalid shape" in str(w.message)]
    fresh, _ = load_model(str(tiny_llama_dir), dtype="float32", device="cpu")
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    assert loaded.base_model.model.model.layers[0].self_attn.q_proj.r["default"] == 0
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected)


def test_bit_operations_are_counted_against_the_lora_of_the_target_rank(tiny_llama_dir):
    from bayeslora.models import load_model
    from bayeslora.reporting.bops import bops_report
    from bayeslora.tuners.costs import reference_adapter_bops

    base, _ = load_model(str(tiny_llama_dir), dtype="float32", device="cpu")
    model = get_peft_model(base, AdaLoraConfig(init_r=3, target_r=2, total_step=10, target_modules=["q_proj"]))
    singular_values = [p for n, p in model.named_parameters() if "lora_E" in n]
    with torch.no_grad():
        for values in singular_values:
            values.fill_(1.0)
    report = bops_report(model)
    lora2 = sum(reference_adapter_bops(32, 32, 2) for _ in singular_values)  # two 32x32 q_proj
    assert report["reference_adapter"] == lora2
    assert report["adapter_ratio"] == pytest.approx(3 / 2)  # nothing pruned yet: rank 3 against LoRA's 2
    with torch.no_grad():
        for values in singular_values:
            values[2] = 0.0  # pruned to the budget
    assert bops_report(model)["adapter_ratio"] == pytest.approx(1.0)
