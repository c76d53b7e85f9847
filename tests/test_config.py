"""RunConfig: coercion, recipes, precedence and validation."""

from __future__ import annotations

import pytest

from bayeslora.config import RunConfig, coerce_value, load_recipe, make_config


def test_precedence_defaults_then_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rank: 4\nlr: 0.001\ntarget_modules: [q_proj, v_proj]\n")
    config = make_config(recipe, lr="2e-4")
    assert config.rank == 4 and config.lr == 2e-4 and config.target_modules == ["q_proj", "v_proj"]
    assert config.batch_size == RunConfig().batch_size


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("rank", "16", 16),
        ("rank", 16.0, 16),
        ("alpha", 32, 32.0),
        ("overwrite", "true", True),
        ("max_steps", None, None),
        ("gate_budget", "none", None),  # an optional option unset from the command line
        ("gate_lr", "Null", None),
        ("target_modules", "q_proj,v_proj", ["q_proj", "v_proj"]),
        ("report_to", ["tensorboard"], ["tensorboard"]),
    ],
)
def test_coercion(name, value, expected):
    assert coerce_value(name, value) == expected


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("rank", "eight", "must be int"),
        ("overwrite", "maybe", "true or false"),
        ("rank", None, "cannot be empty"),
        ("rank", "none", "must be int"),  # not optional
        ("ranks", 8, "Unknown option 'ranks'"),
    ],
)
def test_coercion_errors(name, value, message):
    with pytest.raises(ValueError, match=message):
        coerce_value(name, value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rank": 0}, "--rank must be a positive integer"),
        ({"rank": -3}, "--rank must be a positive integer"),
        ({"lr": 0.0}, "--lr must be positive"),
        ({"dropout": 1.0}, "--dropout"),
        ({"scoring": "logits"}, "--scoring must be one of cloze, letter"),
        ({"samples": -1}, "--samples"),
        ({"target_modules": []}, "--target-modules is empty"),
        ({"limit": 0}, "--limit must be a positive integer"),
    ],
)
def test_validation_names_the_option(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def test_recipe_rejects_unknown_keys_and_non_mappings(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rnak: 8\n")
    with pytest.raises(ValueError, match="Unknown option 'rnak'"):
        load_recipe(bad)
    bad.write_text("- rank\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        load_recipe(bad)
    bad.write_text("rank: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(bad)


def test_default_output_dir():
    assert str(RunConfig(task="mmlu:college_physics", method="lora", seed=3).resolved_output_dir()) == (
        "runs/mmlu-college_physics-lora-seed3"
    )
    assert str(RunConfig(task="data/my.jsonl").resolved_output_dir()) == "runs/my-lora-seed1"


def test_shipped_recipes_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    recipes = sorted(root.rglob("*.yaml"))
    assert recipes
    for recipe in recipes:
        if "accelerate" not in recipe.parts:
            make_config(recipe)


def test_shipped_accelerate_configs_load_and_say_how_to_launch():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    configs = sorted((Path(__file__).resolve().parents[1] / "configs" / "accelerate").glob("*.yaml"))
    assert {c.stem for c in configs} >= {"ddp-gpu", "fsdp", "deepspeed-zero2", "deepspeed-zero3"}
    for config in configs:
        loaded = load_config_from_file(str(config))
        assert loaded.num_processes == 2
        assert "accelerate launch --config_file " + str(config.relative_to(config.parents[2])) in config.read_text()


def test_method_defaults_fill_only_the_options_left_unset():
    from bayeslora.methods import get_method
    from bayeslora.methods.melora import MELORA_SIGMA_LR

    melora = get_method("melora").resolve(make_config(method="melora"))
    assert (melora.sigma_lr, melora.prior_std, melora.sigma_init) == (MELORA_SIGMA_LR, 1.0, 0.1)
    chosen = get_method("melora").resolve(make_config(method="melora", sigma_lr=0.2, prior_std=0.5))
    assert (chosen.sigma_lr, chosen.prior_std, chosen.sigma_init) == (0.2, 0.5, 0.1)
    blob = get_method("blob").resolve(make_config(method="blob"))
    assert (blob.sigma_lr, blob.prior_std, blob.sigma_init) == (None, 0.2, 0.05)  # BLoB's G trains at --lr
    lora = make_config(method="lora")
    assert get_method("lora").resolve(lora) is lora


def test_a_gate_warm_up_of_zero_is_refused_with_the_reason():
    """With no warm-up, B-LoRA's quantizer ranges would be set from the untrained weights (B = 0), capping B."""
    with pytest.raises(ValueError, match=r"--gate-warmup 0 .* B starts at zero"):
        make_config(method="blora", gate_warmup=0.0).validate()
    make_config(method="blora", gate_warmup=0.05).validate()


@pytest.mark.parametrize("method", ["lora", "blora", "melora"])
def test_config_yaml_records_the_options_its_method_uses_and_reads_back_to_the_same_run(tmp_path, method):
    """Method-specific options another method uses (B-LoRA's gates in a LoRA run) are left out: their defaults
    cannot change the run, and an old default recorded there would have to be recognised forever."""
    from bayeslora.config import make_config, option_users
    from bayeslora.io import read_yaml
    from bayeslora.pipeline.common import write_config

    config = make_config(method=method, task="arc-easy", rank=4)
    write_config(tmp_path / "config.yaml", config)
    written = read_yaml(tmp_path / "config.yaml")
    assert ("gate_travel" in written) == (method == "blora")
    assert ("sigma_init" in written) == (method == "melora")
    assert all(option_users(key) is None or key in written for key in ("rank", "lr", "task"))
    assert make_config(**load_recipe(tmp_path / "config.yaml")) == config
