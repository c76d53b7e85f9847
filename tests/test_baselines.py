"""The baselines a reviewer asks for: MAP, MC dropout, deep ensembles (temperature scaling: test_temperature.py)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

import bayeslora as bl
from _toy_models import train_toy
from bayeslora.evaluation.predictive import adapter_dropout, predict_batch
from bayeslora.evaluation.scoring import ClozeScorer
from bayeslora.tasks import MultipleChoiceExample

QUESTIONS = [
    MultipleChoiceExample.from_question(f"Question {i} about the sky?", ["blue", "red", "green"], i % 3)
    for i in range(4)
]


def lora_model(tiny_llama, dropout: float = 0.0, adapters: tuple[str, ...] = ("default",), seed: int = 0):
    model, tokenizer = tiny_llama
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config, adapter_name=adapters[0])
    for name in adapters[1:]:
        peft_model.add_adapter(name, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    return peft_model.eval(), ClozeScorer(tokenizer, num_classes=3)


def test_mc_dropout_samples_differ_and_collapse_to_lora_without_dropout(tiny_llama):
    model, scorer = lora_model(tiny_llama, dropout=0.5)
    batch = scorer.collate(QUESTIONS)
    torch.manual_seed(0)
    _, samples = predict_batch(model, scorer, batch, n_samples=4, dropout=True)
    assert samples.shape == (4, 4, 3)
    assert not torch.allclose(samples[0], samples[1])  # each copy its own masks
    plain, _ = predict_batch(model, scorer, batch, n_samples=1)
    again, _ = predict_batch(model, scorer, batch, n_samples=3)  # dropout off: every sample is LoRA's
    torch.testing.assert_close(again, plain, atol=1e-6, rtol=0)
    assert all(not m.training for m in model.modules())  # evaluation mode restored
    for module in model.modules():  # the sampling path itself, with masks that drop nothing
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    kept, samples = predict_batch(model, scorer, batch, n_samples=3, dropout=True)
    torch.testing.assert_close(kept, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(samples, plain.expand(3, -1, -1), atol=1e-6, rtol=0)


def test_mc_dropout_needs_dropout(tiny_llama):
    model, _ = lora_model(tiny_llama, dropout=0.0)
    with pytest.raises(ValueError, match="--dropout"), adapter_dropout(model):
        pass


def test_ensemble_of_identical_members_equals_one_member(tiny_llama):
    model, scorer = lora_model(tiny_llama, adapters=("member0", "member1"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".member1." in name:
                parameter.copy_(dict(model.named_parameters())[name.replace(".member1.", ".member0.")])
    batch = scorer.collate(QUESTIONS)
    single, _ = predict_batch(model, scorer, batch, members=("member0",))
    for combine in ("probs", "logits"):
        both, per_member = predict_batch(model, scorer, batch, members=("member0", "member1"), combine=combine)
        torch.testing.assert_close(both, single, atol=1e-6, rtol=0)
        assert per_member.shape == (2, 4, 3)
    assert model.active_adapter == "member0"


def test_ensemble_members_differ_and_combine_by_probabilities_or_logits(tiny_llama):
    model, scorer = lora_model(tiny_llama, adapters=("member0", "member1"))
    batch = scorer.collate(QUESTIONS)
    probs, per_member = predict_batch(model, scorer, batch, members=("member0", "member1"))
    assert not torch.allclose(per_member[0], per_member[1])
    torch.testing.assert_close(probs, per_member.mean(0))
    by_logits, _ = predict_batch(model, scorer, batch, members=("member0", "member1"), combine="logits")
    expected = per_member.log().mean(0).softmax(-1)  # mean of log-softmax = mean logits up to a per-row shift
    torch.testing.assert_close(by_logits, expected, atol=1e-5, rtol=0)


def test_ensemble_trains_members_with_their_own_seeds_and_reloads(tiny_llama_dir, toy_task, tmp_path):
    run = train_toy(tiny_llama_dir, toy_task, tmp_path / "ensemble", method="ensemble", ensemble_size=2)
    assert sorted(p.name for p in (run / "adapter").iterdir() if p.is_dir()) == ["member0", "member1"]
    from safetensors.torch import load_file

    first, second = (load_file(str(run / "adapter" / m / "adapter_model.safetensors")) for m in ("member0", "member1"))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    for member, seed in ((first, 1), (second, 2)):  # member k is the LoRA of seed + k (init and data order)
        lora = train_toy(tiny_llama_dir, toy_task, tmp_path / f"lora-{seed}", seed=seed)
        expected = load_file(str(lora / "adapter" / "adapter_model.safetensors"))
        assert member.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(member[key], expected[key], atol=1e-6, rtol=0)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert {entry.get("member") for entry in log} == {"member0", "member1"}
    metrics = json.loads((run / "eval" / "toy" / "metrics.json").read_text())
    assert metrics["n_samples"] == 2 and metrics["steps"] == 8
    again = bl.evaluate(run, output_dir=tmp_path / "again", progress=False)
    assert again["accuracy"] == metrics["accuracy"] and again["nll"] == pytest.approx(metrics["nll"], abs=1e-6)
    from bayeslora.cli import main
    from bayeslora.evaluation import load_predictions

    assert main(["--quiet", "eval", "--run", str(run), "--ensemble-combine", "logits", "--output-dir",
                 str(tmp_path / "logits")]) == 0  # fmt: skip
    members = load_predictions(run / "eval" / "toy").sample_probs  # (K, N, C)
    by_logits = load_predictions(tmp_path / "logits" / "eval" / "toy").probs
    torch.testing.assert_close(by_logits, members.log().mean(0).softmax(-1), atol=1e-5, rtol=0)


def test_map_and_mcdropout_resolve_their_defaults(tiny_llama_dir, toy_task, tmp_path):
    import yaml

    run = train_toy(tiny_llama_dir, toy_task, tmp_path / "map", method="map")  # lr 1e-2: lr·wd = 1e-7 acts
    assert yaml.safe_load((run / "config.yaml").read_text())["weight_decay"] == 1e-5
    with pytest.warns(UserWarning, match="weight decay changes nothing"):  # 1e-4 x 1e-5 rounds away
        train_toy(tiny_llama_dir, toy_task, tmp_path / "map-small-lr", method="map", lr=1e-4)
    run = train_toy(tiny_llama_dir, toy_task, tmp_path / "mcd", method="mcdropout", samples=3)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["dropout"] == 0.1
    metrics = json.loads((run / "eval" / "toy" / "metrics.json").read_text())
    assert metrics["n_samples"] == 3
    mean = bl.evaluate(run, samples=0, output_dir=tmp_path / "mean", progress=False)
    assert mean["n_samples"] == 0
    with pytest.raises(ValueError, match=r"--dropout 0\.0 leaves nothing to sample"):  # refused before training
        train_toy(tiny_llama_dir, toy_task, tmp_path / "mcd-0", method="mcdropout", dropout=0.0)
    assert not (tmp_path / "mcd-0").exists()


@pytest.mark.parametrize(("lr", "weight_decay", "dtype", "vanishes"), [
    (5e-4, 1e-5, torch.float32, True),   # MAP at the benchmarks' learning rate
    (5e-4, 1e-4, torch.float32, False),  # lr·wd = 5e-8, above 2^-25
    (5e-4, 1e-5, torch.float64, False),
])  # fmt: skip
def test_the_weight_decay_warning_matches_what_adamw_does(lr, weight_decay, dtype, vanishes):
    import warnings

    from bayeslora.training.trainer import warn_if_weight_decay_vanishes

    weight = torch.nn.Parameter(torch.randn(1000, dtype=dtype))
    before = weight.detach().clone()
    optimizer = torch.optim.AdamW([weight], lr=lr, weight_decay=weight_decay)
    weight.grad = torch.zeros_like(weight)  # only the decay moves the weights
    optimizer.step()
    assert torch.equal(weight.detach(), before) == vanishes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_weight_decay_vanishes(lr, weight_decay, dtype)
    assert bool([w for w in caught if "changes nothing" in str(w.message)]) == vanishes


def test_options_a_method_does_not_use_are_named_in_a_warning(tiny_llama_dir, toy_task, tmp_path):
    import warnings

    with pytest.warns(UserWarning, match="--ensemble-size is for --method ensemble; --samples is for the methods"):
        run = train_toy(tiny_llama_dir, toy_task, tmp_path / "lora", ensemble_size=5, samples=4)
    with pytest.warns(UserWarning, match="--train-size 100 is more than the 8 training examples"):
        train_toy(tiny_llama_dir, toy_task, tmp_path / "all", train_size=100)
    with pytest.warns(UserWarning, match="--method lora ignores .* --laplace-predictive is for --method laplace"):
        bl.evaluate(run, laplace_predictive="nn", output_dir=tmp_path / "eval", progress=False)
    with warnings.catch_warnings(record=True) as caught:  # used: no such warning
        warnings.simplefilter("always")
        train_toy(tiny_llama_dir, toy_task, tmp_path / "mcd", method="mcdropout", samples=4)
        train_toy(tiny_llama_dir, toy_task, tmp_path / "ens", method="ensemble", ensemble_size=2, samples=4)
    assert not [w for w in caught if "does not use" in str(w.message)]


@pytest.mark.parametrize(
    ("options", "ignored"),
    [
        (
            {"method": "lora", "sigma_init": 0.2, "core": "diag", "gate_lambda": 0.1},
            ["sigma-init", "core", "gate-lambda"],
        ),
        ({"method": "blob", "core": "diag", "prior_std": 0.3}, ["core"]),
        ({"method": "melora", "kl_lr": 0.1, "kl_weight": 0.5}, ["kl-lr"]),
        ({"method": "melora", "kl_schedule": "blob", "kl_lr": 0.1, "kl_weight": 0.5}, ["kl-weight"]),
        ({"method": "blora", "sigma_init": 0.2, "gate_lr": 0.1}, ["sigma-init"]),
        ({"method": "blora", "bayesian_core": True, "sigma_init": 0.2, "core": "diag"}, []),
        ({"method": "ensemble", "laplace_prior": "marglik", "max_bits": 8}, ["laplace-prior", "max-bits"]),
        ({"method": "laplace", "laplace_prior": "marglik", "ensemble_combine": "logits"}, ["ensemble-combine"]),
    ],
)
def test_each_method_specific_option_warns_on_the_methods_that_ignore_it(options, ignored):
    import warnings

    from bayeslora.pipeline.common import given_options, warn_unused_options

    config = bl.RunConfig(**options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_unused_options(config, given_options(config))
    named = " ".join(str(w.message) for w in caught)
    for option in ignored:
        assert f"--{option} is for" in named
    assert named.count(" is for ") == len(ignored)


def test_a_resolved_config_does_not_count_the_method_defaults_as_given():
    """A run's config.yaml holds the defaults its method filled in (B-LoRA fills Me-LoRA's core defaults even
    without --bayesian-core): resuming or re-running it must not warn that the user set them."""
    config = bl.RunConfig(method="blora", gate_lr=0.1)
    resolved = bl.get_method("blora").resolve(config)
    assert resolved.sigma_init is not None
    from bayeslora.pipeline.common import given_options

    assert given_options(resolved) == given_options(config) == ["method", "gate_lr"]


def test_every_option_is_declared_once_in_a_section_or_a_group_that_a_method_uses():
    """Each option belongs to exactly one section (every method's) or method group; every group is used by a
    registered method, for some setting of its options; a group's options are exactly the fields declaring it."""
    import dataclasses

    from bayeslora.config import OPTION_GROUP_USERS, OPTION_GROUPS, SECTIONS

    fields = dataclasses.fields(bl.RunConfig)
    for f in fields:
        assert ("section" in f.metadata) != ("group" in f.metadata), f.name
        assert f.metadata.get("section", "what to train") in SECTIONS
        assert f.metadata.get("group", "core") in OPTION_GROUP_USERS
    used = {
        group
        for method in bl.METHODS.values()
        for setting in (bl.RunConfig(), bl.RunConfig(bayesian_core=True), bl.RunConfig(kl_schedule="blob"))
        for group in method.groups(setting)
    } | {"elbo schedule", "blob schedule"}  # the KL schedule's groups follow the "posterior" group
    assert used == set(OPTION_GROUP_USERS)
    for group, (options, _) in OPTION_GROUPS.items():
        assert set(options) == {f.name for f in fields if f.metadata.get("group") == group}
    assert sum(len(options) for options, _ in OPTION_GROUPS.values()) == 38
