"""Every bayeslora tuner through every PEFT operation a PEFT user relies on, on a tiny Llama and a tiny BERT.

One matrix: (tuner config) x (model) x (operation). The checks are PEFT's own expectations of a tuner: a new
adapter changes nothing, saving and loading gives the same model, merging equals the unmerged posterior mean and
unmerging restores the base, disabling an adapter gives the base, adapters switch, two live side by side and one
can be deleted, the adapter exports to plain LoRA, and a half-precision base runs.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, BertConfig, LlamaForCausalLM

import bayeslora  # noqa: F401  (registers the tuners)
from _toy_models import tiny_llama_config
from bayeslora.runs.export import export_lora
from bayeslora.tuners import BlobConfig, BLoraConfig, MeLoraConfig
from bayeslora.tuners.base import BayesianLowRankLayer
from bayeslora.tuners.sampling import frozen_samples, posterior_mean, sampling

TUNERS = {
    "melora": (MeLoraConfig, {}),
    "melora-diag": (MeLoraConfig, {"core": "diag"}),
    "melora-unit": (MeLoraConfig, {"factor_norm": "unit"}),
    "blob": (BlobConfig, {}),
    "blora": (BLoraConfig, {}),
    "blora-core": (BLoraConfig, {"bayesian_core": True}),
    "blora-core-unit": (BLoraConfig, {"bayesian_core": True, "factor_norm": "unit"}),
    "blora-quantized-base": (BLoraConfig, {"quantize_base": True}),
}
MODELS = ("llama", "bert")


def build_model(kind: str, seed: int = 0):
    """A tiny model and a batch of inputs for it (eval mode)."""
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(tiny_llama_config())
    else:
        config = BertConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_labels=3,
            hidden_dropout_prob=0.0,  # the base's own dropout would make training-mode outputs differ
            attention_probs_dropout_prob=0.0,
        )
        model = AutoModelForSequenceClassification.from_config(config)
    inputs = {"input_ids": torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(1))}
    return model.eval(), inputs


def peft_config(tuner: str, kind: str, **extra):
    cls, options = TUNERS[tuner]
    if kind == "llama":
        targets, task_type = ["q_proj", "v_proj", "lm_head"], "CAUSAL_LM"
    else:
        targets, task_type = ["query", "value"], "SEQ_CLS"
    return cls(r=4, lora_alpha=8, target_modules=targets, task_type=task_type, **{**options, **extra})


def randomise(model, adapter: str = "default", seed: int = 2) -> None:
    """Give ``adapter`` a non-zero update: B (and the classifier head) drawn at random."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith((f"_B.{adapter}", f"_core.{adapter}")) or (f"modules_to_save.{adapter}" in name):
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


def calibrated(model) -> None:
    """Put a B-LoRA adapter in the state training leaves it in (ranges from the weights, gates sampled/fixed)."""
    tuner = model.base_model
    if hasattr(tuner, "set_gate_phase"):
        for layer in tuner.bayesian_layers():
            for adapter in layer.active_adapters:
                if layer._has(adapter):
                    layer.calibrate_ranges(adapter)
        tuner.set_gate_phase("sample")


def output(model, inputs) -> torch.Tensor:
    """The deterministic output (posterior mean) of ``model`` on ``inputs``."""
    with torch.no_grad(), posterior_mean():
        return model(**inputs).logits.float()


@pytest.fixture(params=[(t, m) for t in TUNERS for m in MODELS], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    tuner, kind = request.param
    base, inputs = build_model(kind)
    reference = output(base, inputs)
    model = get_peft_model(base, peft_config(tuner, kind))
    return tuner, kind, model, inputs, reference


def test_a_new_adapter_changes_nothing_in_training_and_evaluation(case):
    """A new adapter's posterior mean is an exact identity, and so are its samples, except those of a core with
    unit factors: its mean starts at zero with σ > 0, so a sample perturbs the model from the start."""
    tuner, _, model, inputs, reference = case
    for mode in ("eval", "train"):
        getattr(model, mode)()
        assert torch.equal(output(model, inputs), reference)  # the posterior mean
        with torch.no_grad(), sampling():
            sampled = model(**inputs).logits
        if tuner in ("melora-unit", "blora-core-unit"):
            assert not torch.equal(sampled, reference)
        else:
            assert torch.equal(sampled, reference)  # gates, quantizers and dropout in their mode


STOCHASTIC = ("melora", "melora-diag", "melora-unit", "blob", "blora-core", "blora-core-unit")


def test_evaluation_mode_is_deterministic_and_sampling_is_asked_for(case):
    """model.eval() predicts with the posterior mean at every call; sampling() draws new weights at every pass;
    frozen_samples() draws once and keeps them for every pass in the block; training mode samples."""
    tuner, _, model, inputs, _ = case
    randomise(model)
    calibrated(model)
    model.eval()
    mean = output(model, inputs)
    with torch.no_grad():
        first, second = model(**inputs).logits, model(**inputs).logits
        assert torch.equal(first, mean) and torch.equal(second, mean)
        with sampling():
            drawn = [model(**inputs).logits for _ in range(2)]
        with frozen_samples():
            kept = [model(**inputs).logits for _ in range(2)]
        model.train()
        trained = [model(**inputs).logits for _ in range(2)]
    if tuner not in STOCHASTIC:
        return
    assert not torch.equal(drawn[0], drawn[1])
    assert not torch.equal(kept[0], mean)
    torch.testing.assert_close(kept[1], kept[0], atol=0, rtol=0)
    assert not torch.equal(trained[0], trained[1])


def test_frozen_samples_refuse_a_pass_with_other_sequences(case):
    tuner, _, model, inputs, _ = case
    if tuner not in STOCHASTIC:
        pytest.skip("a deterministic adapter draws nothing")
    model.eval()
    with torch.no_grad(), frozen_samples():
        model(**inputs)
        with pytest.raises(RuntimeError, match="same sequences"):
            model(input_ids=inputs["input_ids"][:2])


def test_save_and_load_give_the_same_model(case, tmp_path):
    _, kind, model, inputs, _ = case
    randomise(model)
    calibrated(model)
    expected = output(model.eval(), inputs)
    model.save_pretrained(tmp_path / "adapter")
    base, _ = build_model(kind)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(output(loaded, inputs), expected, atol=1e-6, rtol=0)


def test_merge_equals_the_posterior_mean_and_unmerge_restores_the_base(case):
    tuner, _, model, inputs, reference = case
    randomise(model)
    calibrated(model)
    model.eval()
    expected = output(model, inputs)
    if tuner == "blora-quantized-base":
        with pytest.raises(ValueError, match="cannot be merged"):
            model.merge_adapter()
        return
    model.merge_adapter()
    torch.testing.assert_close(output(model, inputs), expected, atol=2e-5, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(output(model, inputs), expected, atol=2e-5, rtol=0)
    with model.disable_adapter():
        torch.testing.assert_close(output(model, inputs), reference, atol=2e-5, rtol=0)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, BayesianLowRankLayer) for m in merged.modules())
    torch.testing.assert_close(output(merged, inputs), expected, atol=2e-5, rtol=0)


def test_disabling_the_adapter_gives_the_base_model(case):
    _, kind, model, inputs, reference = case
    randomise(model)
    calibrated(model)
    model.eval()
    assert not torch.allclose(output(model, inputs), reference)
    with model.disable_adapter():
        if kind == "llama":  # the classifier head of BERT is a trained module of the adapter, kept when disabled
            assert torch.equal(output(model, inputs), reference)
        else:
            assert torch.isfinite(output(model, inputs)).all()


def test_two_adapters_switch_and_one_can_be_deleted(case):
    tuner, kind, model, inputs, _ = case
    randomise(model, "default", seed=2)
    calibrated(model)
    first = output(model.eval(), inputs)
    model.add_adapter("second", peft_config(tuner, kind))
    assert all(not m.training for m in model.modules())  # the new layers take the model's mode
    randomise(model, "second", seed=3)
    model.set_adapter("second")
    calibrated(model)
    second = output(model, inputs)
    assert not torch.allclose(first, second)
    model.set_adapter("default")
    torch.testing.assert_close(output(model, inputs), first, atol=1e-6, rtol=0)
    model.set_adapter("second")
    model.delete_adapter("default")
    assert not any(".default" in name for name, _ in model.named_parameters() if "base_layer" not in name)
    torch.testing.assert_close(output(model, inputs), second, atol=1e-6, rtol=0)
    assert model.active_adapters == ["second"]


def test_export_to_plain_lora_gives_the_posterior_mean(case, tmp_path):
    tuner, kind, model, inputs, _ = case
    randomise(model)
    calibrated(model)
    expected = output(model.eval(), inputs)
    if tuner == "blora-quantized-base":
        with pytest.raises(ValueError, match="quantizes its frozen weight"):
            export_lora(model, tmp_path / "lora")
        return
    export_lora(model, tmp_path / "lora")
    base, _ = build_model(kind)
    loaded = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    assert type(loaded.peft_config["default"]).__name__ == "LoraConfig"
    torch.testing.assert_close(output(loaded, inputs), expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_base_runs_with_fp32_adapters(case, dtype):
    tuner, kind, model, inputs, _ = case
    randomise(model)
    calibrated(model)
    expected = output(model.eval(), inputs)
    base, _ = build_model(kind)
    half = get_peft_model(base.to(dtype), peft_config(tuner, kind))  # PEFT keeps adapter weights in fp32
    half.load_state_dict(model.state_dict(), strict=False)
    calibrated(half)
    layers = [m for m in half.modules() if isinstance(m, BayesianLowRankLayer)]
    adapter_dtypes = {p.dtype for layer in layers for n, p in layer.named_parameters() if "base_layer" not in n}
    assert adapter_dtypes == {torch.float32}  # (a classifier head, PEFT's modules_to_save, keeps the base's dtype)
    got = output(half.eval(), inputs)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=0.15, rtol=0.05)  # a half-precision base's rounding
    half.train()
    loss = half(**inputs).logits.float().square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in half.parameters() if p.grad is not None)


@pytest.mark.parametrize("tuner", list(TUNERS))
def test_unsupported_options_raise_type_error_as_peft_tuners_do(tuner):
    cls, options = TUNERS[tuner]
    with pytest.raises(TypeError, match="bias='all' is not supported"):
        cls(r=4, target_modules=["q_proj"], bias="all", **options)
    with pytest.raises(TypeError, match="linear modules only"):
        cls(r=4, target_modules=["q_proj"], target_parameters=["weight"], **options)


def test_blora_phase_is_saved_and_older_adapters_load_as_trained(tmp_path):
    from safetensors.torch import load_file, save_file

    base, inputs = build_model("llama")
    model = get_peft_model(base, peft_config("blora", "llama"))
    randomise(model)
    layers = model.base_model.bayesian_layers()
    assert {layer.phase for layer in layers} == {"open"}  # a new adapter: nothing quantized, full rank
    calibrated(model)  # now "sample", as training leaves it
    expected = output(model.eval(), inputs)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(build_model("llama")[0], tmp_path / "adapter").eval()
    assert {layer.phase for layer in loaded.base_model.bayesian_layers()} == {"sample"}
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    older = {key: value for key, value in load_file(str(weights)).items() if "blora_phase" not in key}
    save_file(older, str(weights))  # as bayeslora wrote it before the phase was saved
    legacy = PeftModel.from_pretrained(build_model("llama")[0], tmp_path / "adapter").eval()
    assert {layer.phase for layer in legacy.base_model.bayesian_layers()} == {"sample"}
    torch.testing.assert_close(output(legacy, inputs), expected, atol=1e-6, rtol=0)
    opened = get_peft_model(build_model("llama")[0], peft_config("blora", "llama"))
    opened.base_model.set_gate_phase("fixed", "default")
    assert {layer.phase_of("default") for layer in opened.base_model.bayesian_layers()} == {"fixed"}
