"""B-LoRA: gates against their closed forms and Monte Carlo, the quantizer, parity with LoRA, the learned
structure, bit operations, and the exported adapters."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import bayeslora  # noqa: F401  (registers the methods)
from _toy_models import TwoLayers
from bayeslora.methods.blora import GateSchedule, expected_cost, expected_rank_squared, gate_parameters
from bayeslora.reporting.bops import bops_report
from bayeslora.runs.layout import CONFIG_HEADER
from bayeslora.tuners import BLoraConfig, BLoraLayer
from bayeslora.tuners.blora.gates import (
    deterministic_gates,
    gate_logit_for,
    nested_expected_cost,
    prob_nonzero,
    sample_gates,
)
from bayeslora.tuners.blora.quantizer import (
    bit_gate_widths,
    bits_of,
    initial_bounds,
    quantize_fixed,
    quantize_residual,
)
from bayeslora.tuners.costs import adapter_bops
from bayeslora.tuners.sampling import rows_of_examples, sampling


def blora(config: BLoraConfig, seed: int = 0, phase: str = "sample"):
    """A B-LoRA model on two linear layers, in ``phase`` (a new adapter starts ``open``; ``sample`` is where a
    training schedule leaves it after the warm-up)."""
    torch.manual_seed(seed)
    model = get_peft_model(TwoLayers(), config)
    model.base_model.set_gate_phase(phase)
    return model


def layers(model) -> list[BLoraLayer]:
    return [m for m in model.modules() if isinstance(m, BLoraLayer)]


def randomise(model, seed: int = 1) -> None:
    """Non-zero B and e, ranges recalibrated to the new weights."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in layers(model):
            layer.blora_B["default"].normal_(0, 0.3)
            if "default" in layer.blora_e:
                layer.blora_e["default"].uniform_(0.5, 1.5)
            layer.calibrate_ranges("default")


# --- gates ---


def test_gate_probability_matches_closed_form_and_monte_carlo():
    logits = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0, 4.0])
    torch.manual_seed(0)
    samples = sample_gates(logits.expand(200_000, -1))
    empirical = (samples != 0).float().mean(0)
    closed = torch.sigmoid(logits - (2 / 3) * math.log(0.1 / 1.1))
    torch.testing.assert_close(prob_nonzero(logits), closed)
    torch.testing.assert_close(empirical, closed, atol=4e-3, rtol=0)
    assert ((samples == 0) | (samples == 1)).float().mean() > 0.3  # the stretch puts mass on exact 0 and 1
    assert gate_logit_for(0.9) == pytest.approx(float(torch.logit(torch.tensor(0.9))) + (2 / 3) * math.log(1 / 11))
    torch.testing.assert_close(prob_nonzero(torch.tensor(gate_logit_for(0.9))), torch.tensor(0.9))


def test_deterministic_gate_is_on_when_off_probability_below_034():
    logits = torch.tensor([gate_logit_for(0.65), gate_logit_for(0.67)])
    assert deterministic_gates(logits).tolist() == [0.0, 1.0]


def test_nested_expected_cost_matches_monte_carlo():
    logits = torch.tensor([2.0, 0.5, -0.5, 1.0])
    costs = torch.tensor([1.0, 2.0, 4.0, 8.0])
    torch.manual_seed(0)
    on = (sample_gates(logits.expand(200_000, -1)) != 0).float()
    nested = torch.cumprod(on, dim=-1)
    monte_carlo = (nested * costs).sum(-1).mean()
    torch.testing.assert_close(nested_expected_cost(logits, costs), monte_carlo, atol=0.03, rtol=0)


def test_expected_rank_squared_matches_monte_carlo():
    model = blora(BLoraConfig(r=6, target_modules=["q"]))
    layer = layers(model)[0]
    with torch.no_grad():
        layer.blora_rank["default"].copy_(torch.tensor([2.0, 1.0, 0.0, -1.0, 1.5]))
    torch.manual_seed(0)
    on = (sample_gates(layer.blora_rank["default"].detach().expand(200_000, -1)) != 0).float()
    rank = 1 + torch.cumprod(on, -1).sum(-1)
    torch.testing.assert_close(layer.expected_rank("default").detach(), rank.mean(), atol=0.02, rtol=0)
    torch.testing.assert_close(expected_rank_squared(layer, "default").detach(), rank.square().mean(), atol=0.1, rtol=0)


# --- quantizer ---


def test_quantizer_at_32_bits_is_the_identity_within_float_error():
    torch.manual_seed(0)
    x = torch.randn(64, 48)
    bounds = initial_bounds(x, 0.1)
    open_gates = torch.ones(len(bit_gate_widths(32)))
    torch.testing.assert_close(quantize_residual(x, bounds, open_gates), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(quantize_fixed(x, bounds, 32), x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantizer_at_b_bits_takes_at_most_2_to_the_b_values(bits):
    torch.manual_seed(0)
    x = torch.randn(200, 100) * 3
    bounds = torch.tensor([-1.0, 2.0])  # narrower than x: clipping is what keeps the count
    assert quantize_fixed(x, bounds, bits).unique().numel() <= 2**bits
    gates = torch.tensor([1.0 if w <= bits else 0.0 for w in bit_gate_widths(32)])
    residual = quantize_residual(x, bounds, gates)
    torch.testing.assert_close(residual, quantize_fixed(x, bounds, bits), atol=1e-5, rtol=0)
    assert residual.min() >= -1.0 - 1e-6 and residual.max() <= 2.0 + 1e-6


@pytest.mark.parametrize(("floor", "bits"), [(4, 4), (4, 8), (8, 8), (8, 16)])
def test_quantizer_with_a_floor_starts_its_chain_there(floor, bits):
    torch.manual_seed(0)
    x = torch.randn(200, 100) * 3
    bounds = torch.tensor([-1.0, 2.0])
    widths = bit_gate_widths(16, floor)
    assert widths == tuple(w for w in (4, 8, 16) if w > floor)
    gates = torch.tensor([1.0 if w <= bits else 0.0 for w in widths])
    assert bits_of(gates, widths, floor) == bits
    one_step = 3.0 / (2**bits - 1)  # at 16 bits float32 residuals can move a value by one step (module doc)
    atol = 1e-5 if bits <= 8 else 1.01 * one_step
    torch.testing.assert_close(
        quantize_residual(x, bounds, gates, floor), quantize_fixed(x, bounds, bits), atol=atol, rtol=0
    )


def test_quantizer_floor_must_be_a_width_below_the_largest():
    with pytest.raises(ValueError, match="min_bits"):
        bit_gate_widths(16, 3)
    with pytest.raises(ValueError, match="must not exceed"):
        bit_gate_widths(8, 16)
    assert bit_gate_widths(8, 8) == ()


def test_quantizer_gradients_reach_input_range_and_gates():
    x = torch.randn(10, 10, requires_grad=True)
    bounds = torch.tensor([-0.5, 0.5], requires_grad=True)
    gates = torch.full((3,), 0.5, requires_grad=True)
    quantize_residual(x, bounds, gates).square().sum().backward()
    assert x.grad.abs().sum() > 0 and bounds.grad.abs().sum() > 0 and gates.grad.abs().sum() > 0
    inside = (x.detach().abs() < 0.5).float()
    assert torch.equal((x.grad != 0).float(), inside)  # straight through inside the range, 0 where clipped


def test_bits_of_nested_gates():
    widths = bit_gate_widths(16)
    assert widths == (4, 8, 16)
    assert bits_of([1, 1, 1], widths) == 16
    assert bits_of([1, 0, 1], widths) == 4  # nested: a gate after an off gate does not count
    assert bits_of([0, 1, 1], widths) == 2
    with pytest.raises(ValueError, match="max_bits"):
        bit_gate_widths(12)


# --- the layer ---


def test_all_gates_on_at_full_precision_equals_lora():
    config = BLoraConfig(r=4, target_modules=["q", "v"], max_bits=32, rank_gate_init=10, bit_gate_init=10)
    model = blora(config)
    randomise(model)
    base = TwoLayers()  # the same frozen weights, with PEFT's LoRA
    for name in ("q", "v"):
        getattr(base, name).load_state_dict(getattr(model.base_model.model, name).get_base_layer().state_dict())
    reference = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q", "v"]))
    for name in ("q", "v"):
        ours, theirs = getattr(model.base_model.model, name), getattr(reference.base_model.model, name)
        e = ours.blora_e["default"].detach()
        theirs.lora_A["default"].weight.data.copy_(ours.blora_A["default"].detach())
        theirs.lora_B["default"].weight.data.copy_(ours.blora_B["default"].detach() * e)
    x = torch.randn(3, 5, 16)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=0)


def test_rank_gates_off_equal_the_truncated_adapter():
    model = blora(BLoraConfig(r=4, target_modules=["q"], max_bits=8))
    randomise(model)
    layer = layers(model)[0]
    with torch.no_grad():
        layer.blora_rank["default"].copy_(torch.tensor([5.0, -5.0, 5.0]))  # z_1 on, z_2 off: rank 2
    model.eval()
    assert layer.learned_rank("default") == 2
    x = torch.randn(2, 3, 16)
    A = layer.quantize("A", layer.blora_A["default"], "default")[:2]
    B = layer.quantize("B", layer.blora_B["default"], "default")[:, :2]
    e = layer.quantize("e", layer.blora_e["default"], "default")[:2]
    expected = layer.get_base_layer()(x) + layer.scaling["default"] * ((x @ A.T) * e) @ B.T
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    A_eff, B_eff = layer.effective_factors("default")
    assert A_eff.shape == (2, 16) and B_eff.shape == (12, 2)
    torch.testing.assert_close(layer.get_base_layer()(x) + x @ A_eff.T @ B_eff.T, expected, atol=1e-6, rtol=0)


def test_learned_bits_and_evaluation_quantization():
    model = blora(BLoraConfig(r=4, target_modules=["q"], max_bits=16))
    randomise(model)
    layer = layers(model)[0]
    with torch.no_grad():
        layer.blora_A_bits["default"].copy_(torch.tensor([5.0, -5.0, 5.0]))  # 4 bits
        layer.blora_B_bits["default"].copy_(torch.tensor([-5.0, 5.0, 5.0]))  # 2 bits
    model.eval()
    assert layer.learned_bits("default") == {"A": 4, "B": 2, "e": 16}
    A, _ = layer.effective_factors("default")
    assert layer.quantize("A", layer.blora_A["default"], "default").unique().numel() <= 16
    assert layer.quantize("B", layer.blora_B["default"], "default").unique().numel() <= 4
    assert A.unique().numel() <= 16


def test_training_samples_gates_and_evaluation_does_not():
    model = blora(BLoraConfig(r=4, target_modules=["q", "v"], rank_gate_init=0.0, bit_gate_init=0.0))
    randomise(model)
    x = torch.randn(2, 3, 16)
    model.train()
    torch.manual_seed(0)
    first = model(x)
    second = model(x)
    assert not torch.allclose(first, second)  # gates are sampled each pass
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_open_phase_is_full_rank_and_unquantized():
    model = blora(BLoraConfig(r=4, target_modules=["q"], rank_gate_init=-10, bit_gate_init=-10))
    randomise(model)
    layer = layers(model)[0]
    model.base_model.set_gate_phase("open")
    assert layer.learned_rank("default") == 4 and set(layer.learned_bits("default").values()) == {16}  # convention
    x = torch.randn(2, 3, 16)
    A, B, e = (getattr(layer, f"blora_{t}")["default"] for t in "ABe")
    expected = layer.get_base_layer()(x) + layer.scaling["default"] * ((x @ A.T) * e) @ B.T
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    model.base_model.set_gate_phase("sample")
    model.eval()
    assert layer.learned_rank("default") == 1 and set(layer.learned_bits("default").values()) == {2}


def test_no_parameter_is_created_after_construction_and_all_are_trainable():
    config = BLoraConfig(r=4, target_modules=["q", "v"], quantize_base=True)
    model = blora(config)
    before = {name: p for name, p in model.named_parameters() if p.requires_grad}
    x = torch.randn(2, 3, 16)
    for phase in ("open", "sample", "fixed"):
        model.base_model.set_gate_phase(phase)
        model.train()
        model(x).square().mean().backward()
        model.eval()
        model(x)
    after = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    names = {name.split(".")[-2] for name in before}
    assert {"blora_rank", "blora_A_bits", "blora_W_range", "blora_x_bits"} <= names
    assert all(p.device.type == "cpu" for p in before.values())
    optimizer = torch.optim.AdamW(model.parameters())
    seen = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in seen for p in before.values())
    assert {id(p) for p in gate_parameters(model)} <= seen


def test_rank_one_adapter_works_in_every_phase():
    model = blora(BLoraConfig(r=1, target_modules=["q"]))
    randomise(model)
    x = torch.randn(2, 3, 16)
    for phase in ("open", "sample", "fixed"):
        model.base_model.set_gate_phase(phase)
        for mode in ("train", "eval"):
            getattr(model, mode)()
            assert model(x).shape == (2, 3, 16)
    assert layers(model)[0].learned_rank("default") == 1


def test_base_quantization_quantizes_the_input_once_for_both_paths(monkeypatch):
    model = blora(BLoraConfig(r=4, target_modules=["q"], quantize_base=True, bit_gate_init=0.0))
    layer = layers(model)[0]
    calls = []
    original = BLoraLayer.quantize

    def counting(self, name, value, adapter):
        calls.append(name)
        return original(self, name, value, adapter)

    monkeypatch.setattr(BLoraLayer, "quantize", counting)
    model.train()
    layer(torch.randn(2, 3, 16))
    assert calls.count("x") == 1 and calls.count("W") == 1


def test_config_gate_initialisation_reaches_the_layers():
    model = blora(BLoraConfig(r=4, target_modules=["q"], rank_gate_init=1.25, bit_gate_init=-0.5, max_bits=8))
    layer = layers(model)[0]
    assert torch.equal(layer.blora_rank["default"].detach(), torch.full((3,), 1.25))
    assert torch.equal(layer.blora_A_bits["default"].detach(), torch.full((2,), -0.5))


def test_base_quantization_at_32_bits_is_the_base_layer_and_quantizes_below():
    config = BLoraConfig(
        r=4, target_modules=["q"], quantize_base=True, base_max_bits=32, base_min_bits=2, bit_gate_init=10
    )
    model = blora(config)
    layer = layers(model)[0]
    model.eval()
    x = torch.randn(2, 3, 16).clamp(-7.9, 7.9)
    torch.testing.assert_close(layer.base_output(x), layer.get_base_layer()(x), atol=1e-5, rtol=0)
    with torch.no_grad():
        layer.blora_W_bits["default"].copy_(torch.tensor([5.0, -5.0, -5.0, -5.0]))  # W0 at 4 bits
    assert layer.learned_bits("default")["W"] == 4
    weight = layer.quantize("W", layer.get_base_layer().weight, "default")
    assert all(row.unique().numel() <= 16 for row in weight)  # per output channel: 16 levels in each row
    assert weight.unique().numel() > 16
    torch.testing.assert_close(weight.amax(1), layer.get_base_layer().weight.amax(1))  # each row's own range
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()


def test_base_quantizer_never_goes_below_its_floor():
    config = BLoraConfig(r=4, target_modules=["q"], quantize_base=True, base_min_bits=8, bit_gate_init=-10)
    model = blora(config)
    layer = layers(model)[0]
    assert layer.blora_W_bits["default"].shape == (1,) and layer.blora_A_bits["default"].shape == (3,)
    assert layer.learned_bits("default") == {"A": 2, "B": 2, "e": 2, "W": 8, "x": 8}
    assert float(layer.expected_bits("W", "default").detach()) == pytest.approx(8, abs=0.01)  # P(on) ≈ 2e-4
    weight = layer.get_base_layer().weight
    layer.train()  # sampled gates: all off at logit −10, so the chain stops at its 8-bit floor
    torch.testing.assert_close(
        layer.quantize("W", weight, "default"), quantize_fixed(weight, layer.blora_W_range["default"], 8)
    )


def test_activation_range_is_set_from_the_inputs_seen_in_the_warm_up():
    model = blora(BLoraConfig(r=4, target_modules=["q"], quantize_base=True, activation_range=8.0))
    layer = layers(model)[0]
    assert layer.blora_x_range["default"].tolist() == [-8.0, 8.0]
    model.train()
    layer.phase = "open"
    inputs = [torch.randn(2, 3, 16) * 20, torch.randn(2, 3, 16) - 30]  # beyond ±8 both ways
    for x in inputs:
        layer(x)
    model.eval()
    layer(torch.full((1, 1, 16), 100.0))  # evaluation passes are not observed
    layer.calibrate_ranges("default")
    seen = torch.cat([x.flatten() for x in inputs])
    torch.testing.assert_close(layer.blora_x_range["default"].detach(), torch.stack([seen.min(), seen.max()]))
    layer.calibrate_ranges("default")  # nothing seen since: the range is kept
    torch.testing.assert_close(layer.blora_x_range["default"].detach(), torch.stack([seen.min(), seen.max()]))


def test_base_quantizer_at_a_fixed_width_has_no_gates():
    config = BLoraConfig(r=4, target_modules=["q"], quantize_base=True, base_min_bits=8, base_max_bits=8)
    model = blora(config)
    layer = layers(model)[0]
    assert layer.blora_x_bits["default"].numel() == 0
    assert layer.learned_bits("default")["x"] == 8 and float(layer.expected_bits("x", "default").detach()) == 8
    model.train()
    model(torch.randn(2, 3, 16)).square().sum().backward()  # the empty gate chains train without error
    assert layer.blora_A["default"].grad is not None


def test_bayesian_core_samples_per_example_and_has_a_kl():
    config = BLoraConfig(r=4, target_modules=["q"], bayesian_core=True, rank_gate_init=10, bit_gate_init=10)
    model = blora(config)
    randomise(model)
    layer = layers(model)[0]
    assert "default" not in layer.blora_e and layer.core_mean("default").shape == (4, 4)
    assert float(layer.kl("default")) > 0
    model.eval()
    x = torch.randn(1, 3, 16).expand(4, 3, 16)
    with sampling(), rows_of_examples(torch.tensor([0, 0, 1, 1])):
        out = model(x)
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=0)  # one core sample per example
    assert not torch.allclose(out[0], out[2])
    with torch.no_grad():  # rank gates off: rows/columns of S beyond the rank do not act
        layer.blora_rank["default"].fill_(-10)
    A, B = layer.effective_factors("default")
    assert A.shape == (1, 16) and B.shape == (12, 1)


# --- costs and bit operations ---


def test_expected_bops_equal_the_deterministic_structure_when_gates_are_certain():
    model = blora(BLoraConfig(r=4, target_modules=["q", "v"], max_bits=16))
    with torch.no_grad():
        for layer in layers(model):
            layer.blora_rank["default"].copy_(torch.tensor([20.0, 20.0, -20.0]))  # rank 3
            layer.blora_A_bits["default"].copy_(torch.tensor([20.0, -20.0, -20.0]))  # 4 bits
            layer.blora_B_bits["default"].copy_(torch.tensor([20.0, 20.0, -20.0]))  # 8 bits
            layer.blora_e_bits["default"].copy_(torch.tensor([-20.0, -20.0, -20.0]))  # 2 bits
    report = bops_report(model.eval())
    by_hand = sum(3 * n * 4 * 16 + 3 * 2 * 16 + m * 3 * 8 * 16 for n, m in ((16, 12), (12, 16)))
    assert report["adapter"] == pytest.approx(by_hand)
    assert report["reference_adapter"] == pytest.approx(sum(4 * (n + m) * 16 * 16 for n, m in ((16, 12), (12, 16))))
    torch.testing.assert_close(expected_cost(model, "bops"), torch.tensor(by_hand / report["reference_adapter"]))
    assert bops_report(model, sequence_length=10)["adapter"] == pytest.approx(10 * by_hand)
    assert adapter_bops(16, 12, 3, 4, 8, middle_bits=2) == 3 * 16 * 4 * 16 + 12 * 3 * 8 * 16 + 3 * 2 * 16


def test_gate_cost_counts_nested_open_gates():
    model = blora(BLoraConfig(r=4, target_modules=["q"], max_bits=16))
    with torch.no_grad():
        for parameter in gate_parameters(model):
            parameter.fill_(20.0)
    torch.testing.assert_close(expected_cost(model, "gates"), torch.tensor(1.0))
    with torch.no_grad():
        layers(model)[0].blora_rank["default"][0] = -20.0  # the first rank gate off closes the chain
    assert float(expected_cost(model, "gates")) == pytest.approx(1 - 3 / 12, abs=1e-4)  # all 3 rank gates


@pytest.mark.parametrize("quantize_base", [False, True])
def test_the_decided_structure_costs_what_the_bit_operation_report_counts(quantize_base):
    """structure_cost: the cost of the structure as evaluated (every gate decided), equal to the BOPs report of the
    evaluated model, and to the expected cost once every gate is certain."""
    from bayeslora.methods.blora import structure_cost

    model = blora(BLoraConfig(r=4, target_modules=["q", "v"], max_bits=16, quantize_base=quantize_base))
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in gate_parameters(model):
            parameter.copy_(torch.randn_like(parameter) * 4)  # some gates on, some off, in every chain
    report = bops_report(model.eval())
    key = "total_ratio" if quantize_base else "adapter_ratio"
    assert 0.05 < structure_cost(model, "bops") < 0.95
    assert structure_cost(model, "bops") == pytest.approx(report[key], rel=1e-6)
    with torch.no_grad():
        for parameter in gate_parameters(model):
            parameter.copy_(torch.where(parameter > 0, 30.0, -30.0))  # certain gates: expectation = decision
    assert structure_cost(model, "bops") == pytest.approx(float(expected_cost(model, "bops")), rel=1e-4)
    assert structure_cost(model, "gates") == pytest.approx(float(expected_cost(model, "gates")), rel=1e-4)


def test_under_a_budget_the_penalty_weight_is_learned_by_dual_ascent_and_survives_a_checkpoint(tmp_path):
    """--gate-budget b: λ·E[cost]/reference with λ from the GateMultiplier: from λ_scale / R, multiplied by e^κ after
    each step of the gate phase while the expected cost exceeds b and by e^-κ within it, κ = log(R²) / n (it can
    cross [λ_scale / R, λ_scale · R] in one phase), clipped to that range; unchanged in the open phase; saved into a
    checkpoint and read back at the first step of a run resumed from it."""
    from types import SimpleNamespace

    from bayeslora.methods.blora import MULTIPLIER_RANGE, GateMultiplier, GatePenalty, structure_cost

    model = blora(BLoraConfig(r=4, target_modules=["q", "v"], max_bits=16))
    assert float(expected_cost(model, "bops")) > 0.9  # the initial gates: all on
    multiplier = GateMultiplier(budget=0.25, scale=0.05, steps=10)
    low, rate = 0.05 / MULTIPLIER_RANGE, math.log(MULTIPLIER_RANGE**2) / 10
    assert multiplier.value == pytest.approx(low)
    penalty = GatePenalty(0.5, multiplier=multiplier)
    torch.testing.assert_close(penalty(model, None).terms["gate_cost"], low * expected_cost(model, "bops"))
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = SimpleNamespace(global_step=1, is_world_process_zero=True)
    for step in range(3):
        multiplier.on_step_end(args, state, None, model=model)
        assert multiplier.value == pytest.approx(low * math.exp(rate * (step + 1)))
    terms = penalty(model, None)
    torch.testing.assert_close(terms.terms["gate_cost"], multiplier.value * expected_cost(model, "bops"))
    assert terms.logs["gate_multiplier"] == multiplier.value
    assert terms.logs["structure_bops_ratio"] == pytest.approx(structure_cost(model))
    for _ in range(20):
        multiplier.on_step_end(args, state, None, model=model)
    assert multiplier.value == pytest.approx(0.05 * MULTIPLIER_RANGE)  # the whole range in one phase, then clipped
    within = GateMultiplier(budget=2.0, scale=0.05, steps=10)
    within.value = 0.01
    within.on_step_end(args, state, None, model=model)
    assert within.value == pytest.approx(0.01 * math.exp(-rate))  # within the budget it falls
    model.base_model.set_gate_phase("open")
    before = within.value
    within.on_step_end(args, state, None, model=model)
    assert within.value == before  # the gates are not in play: unchanged

    (tmp_path / "checkpoint-1").mkdir()
    multiplier.on_save(args, state, None)
    resumed = GateMultiplier(budget=0.25, scale=0.05, steps=10)
    resumed.on_step_begin(args, state, None)
    assert resumed.value == multiplier.value
    fresh = GateMultiplier(budget=0.25, scale=0.05, steps=10)
    fresh.on_step_begin(args, SimpleNamespace(global_step=0), None)
    assert fresh.value == pytest.approx(low)
    unsaved = GateMultiplier(budget=0.25, scale=0.05, steps=10)  # a checkpoint saved without the multiplier's file
    with pytest.warns(UserWarning, match="gate_multiplier.json is missing"):
        unsaved.on_step_begin(args, SimpleNamespace(global_step=2), None)
    assert unsaved.value == pytest.approx(low)
    with pytest.raises(ValueError, match="budget"):
        GateMultiplier(budget=0.0, scale=0.05, steps=10)
    with pytest.raises(ValueError, match="gate-lambda"):
        GateMultiplier(budget=0.25, scale=0.0, steps=10)


def test_gate_schedule_phases_and_range_calibration():
    schedule = GateSchedule(warmup=0.2, fix=0.1)
    assert [schedule.phase_at(step, 10) for step in range(10)] == ["open"] * 2 + ["sample"] * 7 + ["fixed"]
    with pytest.raises(ValueError):
        GateSchedule(warmup=0.6, fix=0.4)
    model = blora(BLoraConfig(r=4, target_modules=["q"]))
    layer = layers(model)[0]
    schedule._enter(model, "open")
    with torch.no_grad():
        layer.blora_B["default"].fill_(0.5)
    schedule._enter(model, "sample", calibrate=True)  # quantization starts: B's range now covers B
    assert layer.phase == "sample"
    assert float(layer.blora_B_range["default"][1]) >= 0.5


def test_peft_save_and_load_round_trip(tmp_path):
    model = blora(BLoraConfig(r=4, target_modules=["q", "v"], max_bits=8, rank_gate_init=0.3))
    randomise(model)
    model.eval()
    x = torch.randn(2, 3, 16)
    expected = model(x)
    model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(5)
    base = TwoLayers()
    for name in ("q", "v"):
        getattr(base, name).load_state_dict(getattr(model.base_model.model, name).get_base_layer().state_dict())
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(loaded(x), expected)


# --- export ---

EXPORT_SCRIPT = r"""
import sys, torch
from peft import PeftModel
sys.path.insert(0, {tests!r})
from _toy_models import TwoLayers
base = TwoLayers()
base.load_state_dict(torch.load({base!r}))
model = PeftModel.from_pretrained(base, {adapter!r}).eval()
torch.save(model(torch.load({inputs!r})).detach(), {out!r})
assert "bayeslora" not in sys.modules, "the export must load without bayeslora"
"""


def trained_looking_blora(bayesian_core: bool = False):
    """A B-LoRA model with mixed learned ranks and bit-widths."""
    config = BLoraConfig(r=4, target_modules=["q", "v"], max_bits=16, bayesian_core=bayesian_core)
    model = blora(config)
    randomise(model)
    q, v = layers(model)
    with torch.no_grad():
        q.blora_rank["default"].copy_(torch.tensor([5.0, 5.0, -5.0]))  # rank 3
        v.blora_rank["default"].copy_(torch.tensor([-5.0, 5.0, 5.0]))  # rank 1
        q.blora_A_bits["default"].copy_(torch.tensor([5.0, -5.0, -5.0]))  # 4 bits
        v.blora_B_bits["default"].copy_(torch.tensor([5.0, 5.0, -5.0]))  # 8 bits
    return model.eval()


def trained_looking(kind: str):
    """A B-LoRA model with learned structure (``blora``, ``blora-core``), or a Me-LoRA / BLoB model with a
    non-trivial posterior mean."""
    if kind.startswith("blora"):
        return trained_looking_blora(bayesian_core=kind == "blora-core")
    from bayeslora.tuners import BlobConfig, MeLoraConfig

    config = {"melora": MeLoraConfig, "blob": BlobConfig}[kind](r=3, target_modules=["q", "v"])
    torch.manual_seed(0)
    model = get_peft_model(TwoLayers(), config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.split(".")[-2] in ("melora_B", "blob_B", "melora_core"):
                parameter.add_(0.3 * torch.randn_like(parameter))
    return model.eval()


@pytest.mark.parametrize("kind", ["blora", "blora-core", "melora", "blob"])
def test_lora_export_loads_without_bayeslora_and_matches(tmp_path, kind):
    from bayeslora.runs.export import export_lora
    from bayeslora.tuners.sampling import posterior_mean

    model = trained_looking(kind)
    x = torch.randn(2, 3, 16)
    with posterior_mean():
        expected = model(x).detach()
    export_lora(model, tmp_path / "lora")
    with pytest.raises(FileExistsError):
        export_lora(model, tmp_path / "lora")
    frozen = TwoLayers()
    for name in ("q", "v"):
        getattr(frozen, name).load_state_dict(getattr(model.base_model.model, name).get_base_layer().state_dict())
    torch.save(frozen.state_dict(), tmp_path / "base.pt")
    torch.save(x, tmp_path / "x.pt")
    script = EXPORT_SCRIPT.format(
        tests=str(Path(__file__).parent),
        base=str(tmp_path / "base.pt"),
        adapter=str(tmp_path / "lora"),
        inputs=str(tmp_path / "x.pt"),
        out=str(tmp_path / "y.pt"),
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, atol=1e-5, rtol=0)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    if kind.startswith("blora"):
        assert config["rank_pattern"]["v"] == 1 and config["r"] == 3
    else:
        assert config["r"] == 3 and not config["rank_pattern"]


def test_packed_export_round_trip_and_size(tmp_path):
    from bayeslora.runs.export import (
        export_lora,
        export_packed,
        load_packed,
        lora_factors,
        pack_codes,
        packed_to_lora,
        unpack_codes,
    )

    for bits in (2, 4, 8, 16):
        codes = torch.randint(0, 2**bits, (37,))
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 37), codes)
    model = trained_looking_blora()
    export_packed(model, tmp_path / "packed")
    layers_back, description, _ = load_packed(tmp_path / "packed")
    expected = {layer.name: layer for layer in lora_factors(model)}
    for layer in layers_back:
        torch.testing.assert_close(layer.A, expected[layer.name].A, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.B, expected[layer.name].B, atol=1e-6, rtol=0)
    assert description["layers"]["q"]["tensors"]["A"]["bits"] == 4
    packed_to_lora(tmp_path / "packed", tmp_path / "from-packed")
    export_lora(model, tmp_path / "lora", dtype=torch.float16)
    packed_size = (tmp_path / "packed" / "packed_adapter.safetensors").stat().st_size
    lora16_size = (tmp_path / "lora" / "adapter_model.safetensors").stat().st_size
    assert packed_size < lora16_size


def test_packed_32_bit_tensors_are_clipped_like_the_model(tmp_path):
    from bayeslora.runs.export import export_packed, load_packed, lora_factors

    model = blora(BLoraConfig(r=4, target_modules=["q"], max_bits=32, bit_gate_init=10, rank_gate_init=10))
    randomise(model)
    layer = layers(model)[0]
    with torch.no_grad():  # ranges narrower than the tensors: clipping is part of the model
        layer.blora_A_range["default"].mul_(0.5)
        layer.blora_B_range["default"].mul_(0.5)
    model.eval()
    export_packed(model, tmp_path / "packed")
    (back,), _, _ = load_packed(tmp_path / "packed")
    (expected,) = lora_factors(model)
    torch.testing.assert_close(back.A, expected.A, atol=1e-6, rtol=0)
    torch.testing.assert_close(back.B, expected.B, atol=1e-6, rtol=0)


def test_lora_export_adapts_exactly_the_adapted_layers_and_refuses_base_quantization(tmp_path):
    from bayeslora.runs.export import export_lora

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(TwoLayers(), TwoLayers()), BLoraConfig(r=4, target_modules=["0.q"]))
    randomise(model)
    export_lora(model.eval(), tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["0.q"]
    quantized = blora(BLoraConfig(r=4, target_modules=["q"], quantize_base=True))
    with pytest.raises(ValueError, match="quantize-base"):
        export_lora(quantized.eval(), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_packed_loader_rejects_corrupt_files(tmp_path):
    from bayeslora.runs.export import export_packed, load_packed

    export_packed(trained_looking_blora(), tmp_path / "packed")
    weights = tmp_path / "packed" / "packed_adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(ValueError, match="not a readable packed"):
        load_packed(tmp_path / "packed")


def test_saved_bayeslora_adapter_says_how_to_load_it(tmp_path):
    from bayeslora.runs.adapters import save_adapter

    save_adapter(blora(BLoraConfig(r=2, target_modules=["q"])), tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "import bayeslora" in card and "bayeslora-peft-hook.pth" in card and "BLORA" in card


def test_a_run_too_short_for_the_gates_to_close_is_warned_about():
    from bayeslora.methods.blora import warn_if_gates_cannot_close
    from bayeslora.tuners.blora.gates import OFF_THRESHOLD, deterministic_gates, gate_logit_for

    off_logit = gate_logit_for(1 - OFF_THRESHOLD)  # the distance the warning measures ends where a gate is off
    assert deterministic_gates(torch.tensor([off_logit - 1e-3, off_logit + 1e-3])).tolist() == [0.0, 1.0]
    # the RTE benchmark run: 104 steps, 82 of them training the gates, at most ~4.1 of the 3.9 needed
    with pytest.warns(UserWarning, match="82 optimizer steps at --gate-lr 0.05; .* ~4.1 in all, .* takes 3.9"):
        assert warn_if_gates_cannot_close(GateSchedule(0.1, 0.1), 104, 0.05, 3.0, 2 / 3) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # SST-2's run, which compressed, and the RTE run with a larger gate learning rate
        assert warn_if_gates_cannot_close(GateSchedule(0.1, 0.1), 312, 0.05, 3.0, 2 / 3) is None
        assert warn_if_gates_cannot_close(GateSchedule(0.1, 0.1), 104, 0.2, 3.0, 2 / 3) is None


def test_training_a_short_blora_run_warns_that_gates_cannot_close():
    from bayeslora.config import make_config
    from bayeslora.methods import get_method

    model = blora(BLoraConfig(r=4, target_modules=["q"]))
    config = make_config(method="blora", task="sst2", max_steps=20, gate_lr=0.05)
    with pytest.warns(UserWarning, match="The gates will probably all stay on"):
        get_method("blora").training_extras(model, config, n_train=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        longer = make_config(method="blora", task="sst2", max_steps=400, gate_lr=0.05)
        get_method("blora").training_extras(model, longer, n_train=64)


@pytest.mark.parametrize("max_steps", [20, 100, 2000])
def test_the_default_gate_learning_rate_lets_a_gate_travel_the_same_way_in_any_run(max_steps):
    """--gate-lr unset: gate_lr · (steps in which the gates train) = travel · (distance from the initial logit to
    switched off), whatever the run's length; no warning."""
    from bayeslora.config import make_config
    from bayeslora.methods import get_method
    from bayeslora.methods.blora import gate_steps, switch_off_distance
    from bayeslora.tuners.blora.gates import gate_logit_for

    model = blora(BLoraConfig(r=4, target_modules=["q"]))
    config = make_config(method="blora", task="sst2", max_steps=max_steps, gate_travel=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extras = get_method("blora").training_extras(model, config, n_train=64)
    (parameters, gate_lr), *_ = extras.special_lrs
    steps = gate_steps(GateSchedule(config.gate_warmup, config.gate_fix), max_steps)
    assert 0.75 * max_steps <= steps <= 0.85 * max_steps  # the sampled phase: 10 % warm-up, 10 % fixed
    distance = switch_off_distance(3.0, 2 / 3)
    assert distance == pytest.approx(3.0 - gate_logit_for(0.66))
    assert gate_lr * steps == pytest.approx(3.0 * distance)
    names = {n for n, p in model.named_parameters() if any(p is q for q in parameters)}
    assert names and all("_rank." in n or "_bits." in n for n in names)  # the gate logits, nothing else


@pytest.mark.parametrize(("core", "middle_macs"), [("full", 16), ("diag", 4)])
def test_a_cores_bit_operations_count_its_own_multiply_accumulates(core, middle_macs):
    """A full r×r core costs r² MACs per token, a diagonal one r (at 32-bit weights and 16-bit inputs)."""
    from bayeslora.tuners import MeLoraConfig

    melora = get_peft_model(TwoLayers(), MeLoraConfig(r=4, target_modules=["q"], core=core))
    lora = get_peft_model(TwoLayers(), LoraConfig(r=4, target_modules=["q"]))
    extra = bops_report(melora)["adapter"] - bops_report(lora)["adapter"]
    assert extra == middle_macs * 32 * 16
    blora_core = blora(BLoraConfig(r=4, target_modules=["q"], bayesian_core=True, core=core, rank_gate_init=10))
    assert layers(blora_core)[0].adapter_structure("default").core == core


def test_the_derived_gate_learning_rate_counts_the_steps_of_every_process(monkeypatch):
    """With P processes each takes ⌈N/P⌉ examples per epoch, so the gates train for about 1/P of the steps and
    the derived learning rate is about P times larger."""
    from bayeslora.config import make_config
    from bayeslora.methods import get_method

    model = blora(BLoraConfig(r=4, target_modules=["q"]))
    config = make_config(method="blora", task="sst2", epochs=4, batch_size=8)
    rates = {}
    for processes in (1, 2):
        monkeypatch.setenv("WORLD_SIZE", str(processes))
        (_, rates[processes]), *_ = get_method("blora").training_extras(model, config, n_train=640).special_lrs
    assert rates[2] / rates[1] == pytest.approx(2.0, rel=0.05)


def test_an_older_config_of_another_method_does_not_set_the_gate_learning_rate(tmp_path):
    """config.yaml files written when --gate-lr defaulted to 0.05 record it for every method."""
    from bayeslora.config import make_config
    from bayeslora.methods import get_method

    for method, expected in (("lora", None), ("blora", 0.05)):
        recipe = tmp_path / f"{method}.yaml"
        recipe.write_text(f"{CONFIG_HEADER} Reproduce with: ...\nmethod: {method}\ngate_lr: 0.05\n")
        assert make_config(recipe).gate_lr == expected
    with pytest.warns(UserWarning, match="--gate-travel 2 is ignored"):
        model = blora(BLoraConfig(r=4, target_modules=["q"]))
        config = make_config(method="blora", task="sst2", max_steps=400, gate_lr=0.05, gate_travel=2)
        get_method("blora").training_extras(model, config, n_train=64)


def test_an_older_config_yaml_is_read_as_the_version_that_wrote_it_meant_it(tmp_path):
    """Every method's config.yaml records B-LoRA's gate options at that day's defaults (travel 4, no budget): a LoRA
    run's are not "given" (no warning about options LoRA does not use), a B-LoRA run's keep it a run without a
    budget, and its travel next to an explicit --gate-lr is not warned about as chosen."""
    import warnings

    from bayeslora.config import make_config
    from bayeslora.methods import get_method
    from bayeslora.pipeline.common import given_options, warn_unused_options

    old = "gate_lr: {lr}\ngate_travel: 4.0\ngate_budget: null\n"
    (tmp_path / "lora.yaml").write_text(f"{CONFIG_HEADER} Reproduce with: ...\nmethod: lora\n" + old.format(lr=0.05))
    lora = make_config(tmp_path / "lora.yaml")
    assert (lora.gate_travel, lora.gate_budget, lora.gate_lr) == (8.0, 0.25, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warn_unused_options(lora, given_options(lora))
    written = f"{CONFIG_HEADER} Reproduce with: ...\nmethod: blora\ntask: sst2\ngate_travel: 4.0\n"
    (tmp_path / "blora.yaml").write_text(written)  # written before gate_budget existed
    assert (make_config(tmp_path / "blora.yaml").gate_travel, make_config(tmp_path / "blora.yaml").gate_budget) == (
        4.0,
        None,
    )
    (tmp_path / "recipe.yaml").write_text("method: blora\ntask: sst2\n")  # a user's recipe gets today's defaults
    assert make_config(tmp_path / "recipe.yaml").gate_budget == 0.25
    (tmp_path / "given.yaml").write_text(
        f"{CONFIG_HEADER} Reproduce with: ...\nmethod: blora\ntask: sst2\n" + old.format(lr=0.1)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = blora(BLoraConfig(r=4, target_modules=["q"]))
        get_method("blora").training_extras(model, make_config(tmp_path / "given.yaml", max_steps=400), n_train=64)


def test_a_gate_budget_that_can_never_bind_is_refused():
    from bayeslora.config import make_config

    with pytest.raises(ValueError, match="never binds"):
        make_config(method="blora", task="sst2", gate_budget=1.0)
    assert make_config(method="blora", task="sst2", gate_budget=0.5).gate_budget == 0.5
    with pytest.raises(ValueError, match="--gate-budget none as well"):
        make_config(method="blora", task="sst2", gate_lambda=0.0)  # the default budget needs a scale
    assert make_config(method="blora", task="sst2", gate_lambda=0.0, gate_budget=None).gate_lambda == 0.0
    assert make_config(method="lora", task="sst2", gate_lambda=0.0).gate_lambda == 0.0  # LoRA warns it is unused


def test_the_default_b_lora_is_the_setting_chosen_on_held_out_questions(tmp_path):
    """Travel 8 with a budget of 0.25x (benchmarks/results/compression/gates.md); a run written before the budget
    existed had none, whatever today's default."""
    from bayeslora.config import make_config
    from bayeslora.runs.layout import with_legacy_defaults

    config = make_config(method="blora", task="sst2")
    assert (config.gate_travel, config.gate_budget) == (8.0, 0.25)
    assert with_legacy_defaults({"method": "blora"})["gate_budget"] is None
    assert with_legacy_defaults({"method": "blora", "gate_budget": 0.5})["gate_budget"] == 0.5
