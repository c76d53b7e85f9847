"""The posterior width of a Bayesian adapter, measured on ΔW: the closed form against Monte Carlo draws of ΔW
through each layer's own forward pass, its invariance to Me-LoRA's rescaling, and ``bayeslora posterior``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bayeslora as bl
from bayeslora.cli import main
from bayeslora.pipeline.posterior import posterior_report
from bayeslora.tuners import BlobConfig, BLoraConfig, MeLoraConfig
from bayeslora.tuners.blob.layer import BlobLayer
from bayeslora.tuners.blora.layer import BLoraLayer
from bayeslora.tuners.melora.layer import MeLoraLayer

N_IN, N_OUT, RANK, DRAWS = 8, 6, 3, 4000


def _layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(N_IN, N_OUT)
    if kind.startswith("melora"):
        core, factor_norm = kind.split("-")[1:]
        layer = MeLoraLayer(base, "default", MeLoraConfig(r=RANK, core=core, factor_norm=factor_norm))
        means, rhos, ups = layer.melora_core, layer.melora_core_rho, layer.melora_B
    elif kind == "blob":
        layer = BlobLayer(base, "default", BlobConfig(r=RANK))
        means, rhos, ups = layer.blob_A, layer.blob_A_g, layer.blob_B
    else:
        layer = BLoraLayer(base, "default", BLoraConfig(r=RANK, bayesian_core=True))
        means, rhos, ups = layer.blora_core, layer.blora_core_rho, layer.blora_B
    with torch.no_grad():
        ups["default"].normal_()
        means["default"].normal_()
        rhos["default"].uniform_(0.2, 0.6)
    if kind == "blora-gated":  # quantized factors, and the rank gates keep the first two of the three components
        layer.calibrate_ranges("default")
        layer.set_phase("sample")
        with torch.no_grad():
            layer.blora_rank["default"].copy_(torch.tensor([10.0, -10.0]))
        assert layer.learned_rank("default") == 2
    return layer.eval()


def _sampled_updates(layer: nn.Module) -> torch.Tensor:
    """DRAWS draws of s·ΔW, (DRAWS, m, n): each example is the n basis vectors, under its own posterior sample."""
    x = torch.eye(N_IN).expand(DRAWS, N_IN, N_IN)  # example e, token k: e_k
    with torch.no_grad(), bl.frozen_samples():
        outputs = layer(x)  # (E, n, m): row k is W0 e_k + b + s·ΔW e_k
    return (outputs - layer.get_base_layer()(x)).transpose(1, 2)  # (E, m, n)


@pytest.mark.parametrize(
    "kind", ["melora-full-free", "melora-diag-free", "melora-full-unit", "blob", "blora", "blora-gated"]
)
def test_the_width_matches_draws_of_the_weight_update(kind):
    layer = _layer(kind)
    width = layer.posterior_width("default")
    draws = _sampled_updates(layer).double()
    mean = draws.mean(0)
    noise = (draws - mean).square().sum((1, 2)).mean().sqrt()  # measured here: within 0.5 %
    assert width["noise_norm"] == pytest.approx(float(noise), rel=0.02)
    with torch.no_grad():
        expected_mean = torch.linalg.vector_norm(layer.get_delta_weight("default").double())
    assert width["mean_norm"] == pytest.approx(float(expected_mean), rel=1e-6)
    assert width["base_norm"] == pytest.approx(float(torch.linalg.vector_norm(layer.get_base_layer().weight)))
    assert width["noise_to_mean"] == pytest.approx(width["noise_norm"] / width["mean_norm"])


def test_the_width_is_unchanged_by_the_rescaling_that_lowers_a_gaussian_kl():
    """(M_S, Σ_S, B) -> (u·M_S, u·Σ_S, B/u) with free factors: the same ΔW, the same width, only σ's changed."""
    layer = _layer("melora-full-free")
    before = layer.posterior_width("default")
    with torch.no_grad():
        layer.melora_core["default"].mul_(3.0)
        sigma = layer.posterior_std("default") * 3.0
        layer.melora_core_rho["default"].copy_(sigma + torch.log(-torch.expm1(-sigma)))  # softplus⁻¹
        layer.melora_B["default"].div_(3.0)
    after = layer.posterior_width("default")
    for key in ("noise_norm", "mean_norm", "noise_to_mean", "noise_to_base", "sigma_to_mean"):
        assert after[key] == pytest.approx(before[key], rel=1e-5)
    assert after["sigma_mean"] == pytest.approx(3 * before["sigma_mean"], rel=1e-5)


def test_a_deterministic_adapter_has_no_width():
    layer = MeLoraLayer(nn.Linear(N_IN, N_OUT), "default", MeLoraConfig(r=RANK), bayesian=False)
    assert layer.posterior_width("default") is None
    config = BLoraConfig(r=RANK, bayesian_core=True)
    assert BLoraLayer(nn.Linear(N_IN, N_OUT), "default", config, bayesian=False).posterior_width("default") is None
    assert BLoraLayer(nn.Linear(N_IN, N_OUT), "default", BLoraConfig(r=RANK)).posterior_width("default") is None


def test_bayeslora_posterior_reports_a_run_per_module_kind(tiny_llama_dir, toy_task, tmp_path, capsys):
    run = tmp_path / "melora"
    bl.train(model=str(tiny_llama_dir), task=str(toy_task), method="melora", rank=2, epochs=1, batch_size=4,
             train_size=8, limit=4, seed=0, output_dir=str(run), progress=False)  # fmt: skip
    assert main(["posterior", str(run), "--output-dir", str(tmp_path / "widths")]) == 0
    printed = capsys.readouterr().out
    assert "| melora | q_proj |" in printed and "| melora | v_proj |" in printed
    saved = bl.io.read_json(tmp_path / "widths" / "posterior.json")
    layers = saved["layers"][str(run)]
    assert {row["module"] for row in layers} >= {"q_proj", "v_proj"}
    assert all(row["noise_norm"] > 0 for row in layers)
    assert {row["block"] for row in layers if row["module"] == "q_proj"} == {0, 1}

    lora = tmp_path / "lora"
    bl.train(model=str(tiny_llama_dir), task=str(toy_task), method="lora", rank=2, epochs=1, batch_size=4,
             train_size=8, limit=4, seed=0, output_dir=str(lora), progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="no Bayesian layer"):
        posterior_report([lora])
