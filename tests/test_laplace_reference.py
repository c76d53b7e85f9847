"""bayeslora's K-FAC Laplace-LoRA agrees with laplace-torch's on a small LoRA classifier (the full comparison:
benchmarks/laplace_reference.py): the same Kronecker factors (its Monte Carlo Fisher averaged over label draws),
the same log marginal likelihood as a function of the prior precision, the same linearised predictive covariance."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("laplace", reason="laplace-torch is installed by `make setup` (requirements/laplace-reference.txt)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import laplace_reference


def test_kfac_marginal_likelihood_and_linearised_predictive_agree_with_laplace_torch():
    result = laplace_reference.compare(seeds=60)
    for row in result["factors"]:
        assert row["input_factor"] < 1e-6  # no labels involved: the same matrix
        assert row["kfac"] < 0.05  # the Monte Carlo Fisher, averaged over 60 draws, against the exact one
    for row in result["log_marginal_likelihood"]:
        assert row["ours_minus_at_1"] == pytest.approx(row["reference_minus_at_1"], abs=0.5)
    assert all(row["relative_error"] < 0.02 for row in result["glm_covariance"])
