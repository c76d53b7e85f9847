"""Me-LoRA and BLoB: parity with LoRA in their degenerate settings, KL against torch.distributions,
the sampled weight distribution, per-example sampling, PEFT save/load/merge."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.distributions import Normal, kl_divergence
from transformers import LlamaForCausalLM

import bayeslora  # noqa: F401  (registers the tuners)
from _toy_models import tiny_llama_config
from bayeslora.evaluation.predictive import predict_batch
from bayeslora.evaluation.scoring import ClozeScorer
from bayeslora.methods.variational import blob_cycle_length, blob_pi, model_kl
from bayeslora.tasks import MultipleChoiceExample
from bayeslora.tuners import BlobConfig, BlobLayer, MeLoraConfig, MeLoraLayer
from bayeslora.tuners.sampling import posterior_mean, rows_of_examples

TARGETS = ["q_proj", "v_proj"]


def tiny_llama(seed: int = 0, vocab: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab)).eval()


def lora_with_random_b(model):
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return lora


def copy_lora_into(bayes, lora, a_name: str, b_name: str) -> None:
    """Give the Bayesian adapter LoRA's A (its mean) and B."""
    lora_layers = {n: m for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    with torch.no_grad():
        for name, module in bayes.named_modules():
            if isinstance(module, MeLoraLayer | BlobLayer):
                source = lora_layers[name]
                getattr(module, a_name)["default"].copy_(source.lora_A["default"].weight)
                getattr(module, b_name)["default"].copy_(source.lora_B["default"].weight)


@pytest.mark.parametrize("factor_norm", ["free", "unit"])
def test_melora_in_its_degenerate_setting_equals_lora(factor_norm):
    """Free factors with M_S = I, or unit factors with M_S = diag(‖b_i‖·‖a_i‖) (so that B̂·M_S·Â = B·A), and
    Σ_S -> 0: exactly LoRA with the same A and B."""
    ids = torch.randint(0, 64, (3, 9))
    lora = lora_with_random_b(tiny_llama())
    expected = lora(input_ids=ids).logits
    config = MeLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, factor_norm=factor_norm)
    melora = get_peft_model(tiny_llama(), config)
    copy_lora_into(melora, lora, "melora_A", "melora_B")
    with torch.no_grad():
        for module in melora.modules():
            if isinstance(module, MeLoraLayer) and factor_norm == "unit":
                a_norms = module.melora_A["default"].norm(dim=1)
                b_norms = module.melora_B["default"].norm(dim=0)
                module.melora_core["default"].copy_(torch.diag(a_norms * b_norms))
    with torch.no_grad(), posterior_mean():
        torch.testing.assert_close(melora(input_ids=ids).logits, expected, atol=2e-6, rtol=0)
        if factor_norm == "free":
            assert torch.equal(melora(input_ids=ids).logits, expected)  # M_S = I: exactly LoRA
    with torch.no_grad():
        for module in melora.modules():
            if isinstance(module, MeLoraLayer):
                module.melora_core_rho["default"].fill_(-1e4)  # Σ_S -> 0 (floored at 1e-8)
        torch.testing.assert_close(melora(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_blob_with_zero_variance_equals_lora():
    ids = torch.randint(0, 64, (3, 9))
    lora = lora_with_random_b(tiny_llama())
    expected = lora(input_ids=ids).logits
    blob = get_peft_model(tiny_llama(), BlobConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    copy_lora_into(blob, lora, "blob_A", "blob_B")
    with torch.no_grad(), posterior_mean():
        assert torch.equal(blob(input_ids=ids).logits, expected)
    with torch.no_grad():
        for module in blob.modules():
            if isinstance(module, BlobLayer):
                module.blob_A_g["default"].zero_()
        torch.testing.assert_close(blob(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("core", ["full", "diag"])
@pytest.mark.parametrize("prior_mean", ["identity", "zero"])
def test_melora_kl_matches_torch_distributions(core, prior_mean):
    layer = MeLoraLayer(nn.Linear(6, 5), "default", MeLoraConfig(r=3, core=core, prior_mean=prior_mean, prior_std=0.7))
    with torch.no_grad():
        layer.melora_core["default"].normal_()
        layer.melora_core_rho["default"].normal_()
    mean, std = layer.melora_core["default"], layer.posterior_std("default")
    center = torch.zeros_like(mean) if prior_mean == "zero" else layer.prior_center("default")
    expected = kl_divergence(Normal(mean.double(), std.double()), Normal(center.double(), 0.7)).sum()
    torch.testing.assert_close(layer.kl("default"), expected)


def test_blob_kl_matches_torch_distributions():
    layer = BlobLayer(nn.Linear(6, 5), "default", BlobConfig(r=3))
    mean, std = layer.blob_A["default"], layer.posterior_std("default")
    expected = kl_divergence(Normal(mean.double(), std.double()), Normal(0.0, 0.2)).sum()
    torch.testing.assert_close(layer.kl("default"), expected)
    # the paper's initialisation: σ = G² with G ~ U(ε/√2, ε), ε = 0.05
    assert float(std.detach().min()) >= 0.05**2 / 2 and float(std.detach().max()) <= 0.05**2


def _rescaled(layer: MeLoraLayer, u: float) -> None:
    """The scale symmetry of B·S·A: core mean and standard deviation times u, B divided by u."""
    with torch.no_grad():
        layer.melora_core["default"].mul_(u)
        sigma = layer.posterior_std("default") * u
        layer.melora_core_rho["default"].copy_(sigma + torch.log(-torch.expm1(-sigma)))  # softplus⁻¹
        layer.melora_B["default"].div_(u)


def _sampled(layer: MeLoraLayer, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return layer(x)


@pytest.mark.parametrize("prior", ["identity", "zero"])
def test_with_free_factors_the_rescaling_leaves_the_model_and_lowers_the_kl(prior):
    """(M_S, Σ_S, B) -> (u·M_S, u·Σ_S, B/u): the same samples of ΔW, but a lower KL, whichever the prior's centre;
    with M_S = I, σ = 0.1, σ_p = 1 and r = 8 the KL per layer falls from 115.7 at u = 1 to 63.6 at u = 3.22
    (identity prior), KL(u) = −r²·log u + r²σ²u²/(2σ_p²) + r(u − 1)²/(2σ_p²) + const."""
    config = MeLoraConfig(r=8, sigma_init=0.1, prior_std=1.0, factor_norm="free", prior_mean=prior)
    layer = MeLoraLayer(nn.Linear(16, 12), "default", config)
    with torch.no_grad():
        layer.melora_B["default"].normal_()
    x = torch.randn(5, 3, 16)
    before, kl_before = _sampled(layer, x), float(layer.kl("default"))
    _rescaled(layer, 3.22)
    torch.testing.assert_close(_sampled(layer, x), before, atol=1e-5, rtol=1e-5)  # the same model
    assert float(layer.kl("default")) < kl_before - 20  # ... at a lower KL
    if prior == "identity":
        assert kl_before == pytest.approx(115.69, abs=0.01)
        assert float(layer.kl("default")) == pytest.approx(63.56, abs=0.01)


def test_with_unit_factors_no_rescaling_lowers_the_kl_for_free():
    """The same transformation changes the model (B̂ does not change, S does); scaling B or A alone changes
    neither the model nor the KL."""
    layer = MeLoraLayer(nn.Linear(16, 12), "default", MeLoraConfig(r=8, factor_norm="unit"))
    with torch.no_grad():
        layer.melora_core["default"].normal_(0, 0.5)
    x = torch.randn(5, 3, 16)
    before, kl_before = _sampled(layer, x), layer.kl("default")
    with torch.no_grad():
        layer.melora_B["default"].mul_(7.0)
        layer.melora_A["default"].mul_(0.1)
    torch.testing.assert_close(_sampled(layer, x), before, atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.kl("default"), kl_before)
    _rescaled(layer, 3.22)
    assert not torch.allclose(_sampled(layer, x), before, atol=1e-3)  # no longer a symmetry of the model


@pytest.mark.parametrize("factor_norm", ["free", "unit"])
def test_with_a_log_uniform_prior_no_rescaling_changes_the_objective(factor_norm):
    """p(|S_ij|) ∝ 1/|S_ij|: the KL depends on σ/|M_S| entry by entry. With free factors the symmetry
    (M_S, Σ_S, B) -> (u·M_S, u·Σ_S, B/u), and more generally S -> G·S·H⁻¹ with A -> H·A, B -> B·G⁻¹ for positive
    diagonal G and H, leaves the model and now the KL too; with unit factors rescaling A or B alone changes neither."""
    torch.manual_seed(1)
    config = MeLoraConfig(r=4, sigma_init=0.3, factor_norm=factor_norm, core_prior="log-uniform")
    layer = MeLoraLayer(nn.Linear(16, 12), "default", config)
    with torch.no_grad():
        layer.melora_B["default"].normal_()
        layer.melora_core["default"].normal_()
    x = torch.randn(5, 3, 16)
    before, kl_before = _sampled(layer, x), float(layer.kl("default").detach())
    assert kl_before > 1.0
    g, h = torch.rand(4) + 0.5, torch.rand(4) + 0.5  # positive diagonal rescalings of S's rows and columns
    with torch.no_grad():
        layer.melora_core["default"].mul_(g[:, None] / h[None, :])
        sigma = layer.posterior_std("default") * (g[:, None] / h[None, :])
        layer.melora_core_rho["default"].copy_(sigma + torch.log(-torch.expm1(-sigma)))  # softplus⁻¹
        layer.melora_B["default"].div_(g)
        layer.melora_A["default"].mul_(h[:, None])
    if factor_norm == "free":
        torch.testing.assert_close(_sampled(layer, x), before, atol=1e-5, rtol=1e-5)  # the same model
    assert float(layer.kl("default")) == pytest.approx(kl_before, rel=1e-5)  # ... and the same KL
    _rescaled(layer, 3.22)
    assert float(layer.kl("default")) == pytest.approx(kl_before, rel=1e-5)


def test_the_log_uniform_kl_matches_quadrature():
    """KL(N(θ, αθ²) || p(|w|) ∝ 1/|w|) = −½·log α + E[log|1 + √α·ε|] + c, ε ~ N(0, 1) (the log-uniform prior is
    improper; c makes the KL vanish as α -> ∞: c = (γ + log 2)/2), computed by quadrature in float64, against the
    fit of Molchanov et al. (2017), which is within 0.01 of it; invariant to θ's scale."""
    import numpy as np
    from scipy import integrate

    from bayeslora.tuners.base import log_uniform_kl

    def exact(alpha: float) -> float:
        root = np.sqrt(alpha)
        integrand = lambda e: np.exp(-e * e / 2) / np.sqrt(2 * np.pi) * np.log(abs(1 + root * e))  # noqa: E731
        pole = -1 / root  # the integrable singularity of log|1 + √α·ε|, at an end of both pieces
        expectation = sum(integrate.quad(integrand, a, b, limit=200)[0] for a, b in ((-40, pole), (pole, 40)))
        return -0.5 * np.log(alpha) + expectation + (np.euler_gamma + np.log(2)) / 2

    for log_alpha in np.linspace(-4, 6, 11):
        sigma = float(np.exp(log_alpha / 2))
        for theta in (0.3, -2.0):  # σ = √α·|θ|
            fitted = float(log_uniform_kl(torch.tensor([theta]), torch.tensor([sigma * abs(theta)])))
            assert fitted == pytest.approx(exact(float(np.exp(log_alpha))), abs=0.01)


@pytest.mark.parametrize("method", ["melora", "blora"])
def test_the_core_prior_reaches_the_layers(method):
    import bayeslora as bl

    options = {"bayesian_core": True} if method == "blora" else {}
    config = bl.get_method(method).resolve(bl.RunConfig(method=method, core_prior="log-uniform", **options))
    peft_config = bl.get_method(method).peft_config(config, TARGETS, "CAUSAL_LM", total_steps=10)
    model = get_peft_model(tiny_llama(), peft_config)
    cores = [m for m in model.modules() if hasattr(m, "core_prior")]
    assert cores and all(m.core_prior["default"] == "log-uniform" for m in cores)


@pytest.mark.parametrize("factor_norm", ["free", "unit"])
@pytest.mark.parametrize("core", ["full", "diag"])
def test_melora_sampled_weights_have_the_analytic_mean_and_covariance(core, factor_norm):
    """vec ΔW = s (Aᵀ ⊗ B) vec S: mean s·B·M·A, covariance s² (Aᵀ⊗B) diag(vec Σ²) (Aᵀ⊗B)ᵀ (a diagonal
    core is the full one with zero mean and zero variance off the diagonal); with unit factors A and B are
    Â and B̂."""
    torch.manual_seed(0)
    n, m, r = 3, 2, 2
    base = nn.Linear(n, m, bias=False)
    nn.init.zeros_(base.weight)
    layer = MeLoraLayer(base, "default", MeLoraConfig(r=r, lora_alpha=2.0, core=core, factor_norm=factor_norm))
    with torch.no_grad():
        layer.melora_B["default"].normal_()
        layer.melora_core["default"].normal_()
        layer.melora_core_rho["default"].normal_(0, 0.5)
    A, B = (
        t.detach().double()
        for t in layer.scaled_factors(layer.melora_A["default"], layer.melora_B["default"], "default")
    )
    M = layer.melora_core["default"].detach().double()
    s, sigma = layer.scaling["default"], layer.posterior_std("default").detach().double()
    if core == "diag":
        M, sigma = torch.diag(M), torch.diag(sigma)
    samples = 200_000
    probe = torch.eye(n).expand(samples, n, n)  # each example: the n basis vectors as its tokens
    with torch.no_grad():
        columns = layer(probe).double()  # (K, n, m): row j is ΔW e_j, the j-th column of ΔW
    vec = columns.reshape(samples, n * m)  # column-major vec(ΔW)
    kron = s * torch.kron(A.T.contiguous(), B)  # (n·m, r·r)
    mean = kron @ M.T.reshape(-1)
    cov = kron @ torch.diag(sigma.T.reshape(-1) ** 2) @ kron.T
    torch.testing.assert_close(vec.mean(0), mean, atol=0.02 * float(mean.abs().max()) + 1e-3, rtol=0)
    empirical = torch.cov(vec.T)
    torch.testing.assert_close(empirical, cov, atol=0.02 * float(cov.abs().max()), rtol=0)
    assert torch.linalg.matrix_rank(cov) <= r * r


@pytest.mark.parametrize("config", [MeLoraConfig(r=3), BlobConfig(r=3)], ids=["melora", "blob"])
def test_samples_per_example_differ_and_repeat_with_the_seed(config):
    layer_cls = MeLoraLayer if isinstance(config, MeLoraConfig) else BlobLayer
    layer = layer_cls(nn.Linear(5, 4), "default", config)
    with torch.no_grad():
        getattr(layer, layer.adapter_layer_names[1])["default"].normal_()  # B != 0
        if isinstance(layer, BlobLayer):
            layer.blob_A_g["default"].fill_(0.5)
    x = torch.randn(1, 6, 5).expand(4, 6, 5)  # four identical rows
    with torch.no_grad():
        torch.manual_seed(7)
        first = layer(x)
        torch.manual_seed(7)
        again = layer(x)
        torch.manual_seed(7)
        with rows_of_examples(torch.tensor([0, 0, 1, 1])):
            grouped = layer(x)
    assert torch.equal(first, again)  # same seed, same samples
    assert not torch.allclose(first[0], first[1])  # each row its own sample
    if isinstance(layer, MeLoraLayer):  # one core per example, shared by its rows
        # (identical rows may differ by float rounding of the batched matmul, ~1e-7)
        torch.testing.assert_close(grouped[0], grouped[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(grouped[2], grouped[3], atol=1e-5, rtol=0)
        assert not torch.allclose(grouped[0], grouped[2])


def test_batched_samples_equal_separate_passes(monkeypatch, smol_tokenizer):
    """N samples in one tiled pass give what N separate passes give with the same core samples."""
    model = get_peft_model(tiny_llama(vocab=len(smol_tokenizer)), MeLoraConfig(r=4, target_modules=TARGETS))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MeLoraLayer):
                module.melora_B["default"].normal_(0, 0.5)
    bank: dict[int, torch.Tensor] = {}
    offset = {"value": 0}

    def fixed_cores(self, adapter, num_examples):
        noise = bank.setdefault(id(self), torch.randn(64, *self.melora_core[adapter].shape))
        start = offset["value"]
        return self.melora_core[adapter] + self.posterior_std(adapter) * noise[start : start + num_examples]

    monkeypatch.setattr(MeLoraLayer, "sample_cores", fixed_cores)
    examples = [
        MultipleChoiceExample.from_question(f"Question {i} about the sky?", ["blue", "red", "green"], 0)
        for i in range(3)
    ]
    scorer = ClozeScorer(smol_tokenizer, num_classes=3)
    batch = scorer.collate(examples)
    probs, per_sample = predict_batch(model, scorer, batch, n_samples=4)
    separate = []
    for k in range(4):
        offset["value"] = k * len(examples)
        separate.append(predict_batch(model, scorer, batch, n_samples=1)[0])
    torch.testing.assert_close(per_sample, torch.stack(separate), atol=1e-6, rtol=0)
    torch.testing.assert_close(probs, torch.stack(separate).mean(0), atol=1e-6, rtol=0)
    assert not torch.allclose(separate[0], separate[1])  # the samples really differ


@pytest.mark.parametrize(
    "config",
    [MeLoraConfig(r=4, target_modules=TARGETS), BlobConfig(r=4, target_modules=TARGETS)],
    ids=["melora", "blob"],
)
def test_peft_round_trip_in_a_fresh_process(tmp_path, config):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    model = get_peft_model(tiny_llama(), config)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_()
    model.save_pretrained(adapter_dir)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad(), posterior_mean():
        expected = model(input_ids=ids).logits
    state = {k: v for k, v in model.state_dict().items() if "melora_" in k or "blob_" in k}
    torch.save({"ids": ids, "expected": expected, "state": state}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import json, torch
        import bayeslora  # registers the methods
        from bayeslora.tuners.sampling import posterior_mean
        from peft import PeftModel
        from transformers import LlamaForCausalLM
        ref = torch.load({str(tmp_path / "expected.pt")!r})
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained({str(base_dir)!r}), {str(adapter_dir)!r})
        model.eval()
        with torch.no_grad(), posterior_mean():
            out = model(input_ids=ref["ids"]).logits
        state = model.state_dict()
        same = all(torch.equal(state[k], v) for k, v in ref["state"].items())
        print(json.dumps({{"max_diff": float((out - ref["expected"]).abs().max()), "same": same,
                          "type": type(model.peft_config["default"]).__name__}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["same"] and report["max_diff"] == 0.0
    assert report["type"] == type(config).__name__


@pytest.mark.parametrize(
    "config",
    [MeLoraConfig(r=4, target_modules=TARGETS), BlobConfig(r=4, target_modules=TARGETS)],
    ids=["melora", "blob"],
)
def test_posterior_mean_merges_into_the_base_weights(config):
    model = get_peft_model(tiny_llama(), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad(), posterior_mean():
        expected = model(input_ids=ids).logits
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        merged = model.merge_and_unload()
    assert not any("melora" in n or "blob" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_model_kl_and_trainable_parameter_counts():
    """Me-LoRA adds 2r² per layer to LoRA's r(n + m); BLoB has r(2n + m)."""
    counts = {}
    for name, config in (
        ("lora", LoraConfig(r=4, target_modules=TARGETS)),
        ("melora", MeLoraConfig(r=4, target_modules=TARGETS)),
        ("blob", BlobConfig(r=4, target_modules=TARGETS)),
    ):
        model = get_peft_model(tiny_llama(), config)
        counts[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if name != "lora":
            assert model_kl(model).dtype == torch.float64 and float(model_kl(model)) > 0
    # 2 layers x (q: 32->32, v: 32->16)
    assert counts["lora"] == 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert counts["melora"] == counts["lora"] + 4 * 2 * 16
    assert counts["blob"] == 2 * (4 * (64 + 32) + 4 * (64 + 16))


def test_blob_kl_reweighting_sums_to_one_per_cycle():
    cycle = blob_cycle_length(n_train=640, batch_size=4)
    assert cycle == int(100 * 640 ** (3.141592653589793 / 8) / 4)
    weights = [blob_pi(step, cycle) for step in range(1, cycle + 1)]
    assert sum(weights) == pytest.approx(1.0, rel=1e-9)
    assert weights[-1] == pytest.approx(2**cycle / (2 ** (cycle + 1) - 1))
    assert blob_pi(cycle + 1, cycle) == weights[0]  # the cycle restarts
    assert blob_pi(5, 5000) == 0.0 or blob_pi(5, 5000) < 1e-300  # no overflow for long cycles


def test_an_adapter_saved_before_factor_norm_existed_loads_with_free_factors(tmp_path):
    model = get_peft_model(tiny_llama(), MeLoraConfig(r=4, target_modules=TARGETS, factor_norm="free"))
    model.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    saved = json.loads(path.read_text())
    assert saved["factor_norm"] == "free" and saved["prior_mean"] == "identity"
    del saved["factor_norm"]  # as bayeslora 0.1 wrote it
    path.write_text(json.dumps(saved))
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert loaded.peft_config["default"].factor_norm == "free"


def test_a_unit_core_resolves_its_own_prior_and_core_learning_rate():
    import bayeslora as bl

    unit = bl.get_method("melora").resolve(bl.RunConfig(method="melora", factor_norm="unit"))
    assert (unit.prior_mean, unit.core_lr) == ("zero", 0.05)
    free = bl.get_method("melora").resolve(bl.RunConfig(method="melora"))
    assert (free.factor_norm, free.prior_mean, free.core_lr) == ("free", "identity", None)
    assert MeLoraConfig(r=2, factor_norm="unit").prior_mean == "zero"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blob_keeps_its_flipout_signs_in_one_byte(dtype):
    """What autograd keeps for BLoB's backward pass: the two sign tensors in int8 by default, in the input's dtype
    in the reference layout; the rest is the same, and both draw fair ±1 signs."""
    from bayeslora.tuners import BlobConfig
    from bayeslora.tuners.blob.layer import _random_signs

    saved = {}
    for layout in ("int8", "reference"):
        torch.manual_seed(0)
        model = get_peft_model(
            nn.Sequential(nn.Linear(64, 32)), BlobConfig(r=4, target_modules=["0"], flipout_signs=layout)
        )
        model.to(dtype).train()
        x = torch.randn(3, 10, 64, dtype=dtype, requires_grad=True)
        kept: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(kept.append, lambda t: t):  # pack returns None: not unpacked
            model(x).sum()
        saved[layout] = {(tuple(t.shape), t.dtype) for t in kept}
    signs = {((3, 10, 64), torch.int8), ((3, 10, 4), torch.int8)}
    assert signs <= saved["int8"]
    assert {((3, 10, 64), dtype), ((3, 10, 4), dtype)} <= saved["reference"]
    assert saved["int8"] - signs == saved["reference"] - {((3, 10, 64), dtype), ((3, 10, 4), dtype)}
    draws = _random_signs(torch.Size([100_000]), torch.zeros(1))
    assert draws.dtype == torch.int8 and set(draws.unique().tolist()) == {-1, 1}
    assert abs(float(draws.float().mean())) < 0.02  # fair: 4.5 standard errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_low_rank_output_is_added_in_slices_and_rounded_once_to_the_output_dtype(monkeypatch, dtype):
    from bayeslora.tuners import base

    torch.manual_seed(0)
    result, code, B = torch.randn(3, 5, 40).to(dtype), torch.randn(3, 5, 4), torch.randn(40, 4)
    exact = result.double() + 1.5 * (code.double() @ B.double().T)  # float64 reference
    monkeypatch.setattr(base, "LOW_RANK_CHUNK_BYTES", 2 * 40 * 4)  # two rows per slice: 8 slices of 15 rows
    added = base.add_low_rank_(result.clone(), code, B, 1.5)
    strided = base.add_low_rank_(result.clone().transpose(0, 1), code.transpose(0, 1), B, 1.5)  # added whole
    for value in (added, strided.transpose(0, 1)):
        assert value.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(value.double(), exact, rtol=1e-6, atol=1e-6)
        else:  # the float32 sum rounded once to bf16: the exact sum's rounding (adding a rounded Δ rounds twice)
            assert torch.equal(value, exact.to(dtype))


@pytest.mark.parametrize("method", [MeLoraConfig, BlobConfig])
def test_a_layer_without_autograd_adds_its_output_as_with_autograd(monkeypatch, method):
    from bayeslora.tuners import base

    monkeypatch.setattr(base, "LOW_RANK_CHUNK_BYTES", 3 * 64 * 4)  # the head's 14 rows in slices of 3
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), method(r=4, target_modules=[*TARGETS, "lm_head"])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_B" in name:
                p.normal_(0, 0.5)
    ids = torch.randint(0, 64, (2, 7))
    with_grad = model(input_ids=ids).logits
    with torch.no_grad():
        without = model(input_ids=ids).logits
    assert with_grad.requires_grad and not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-5, atol=1e-5)
