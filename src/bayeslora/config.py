"""The run configuration: one dataclass whose fields carry their help text.

The same fields are the CLI flags (``--batch-size``), the keys of a YAML recipe (``batch_size: 8``) and
the ``config.yaml`` a run directory keeps to be reproduced. Precedence: defaults < recipe < flags.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import read_yaml


def _opt(default: Any, help: str, group: str | None = None, **extra: Any) -> Any:
    """A dataclass field with help text (and optional CLI choices); ``group`` names the method-specific option
    group it belongs to (:data:`OPTION_GROUP_USERS`), None for an option of every method."""
    metadata = {"help": help, **({"group": group} if group else {}), **extra}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """Everything that defines a fine-tuning run; ``config.yaml`` in a run directory is this, resolved."""

    # --- what to train ---
    model: str = _opt("smollm2-135m", "Base model: built-in alias (smollm2-135m, minilm-l6), local folder or HF id.")
    task: str = _opt("arc-easy", "Training task: registry name (see `bayeslora tasks`), local .jsonl file or hf:<id>.")
    method: str = _opt("lora", "Adapter method (see `bayeslora methods`).")
    scoring: str | None = _opt(
        None,
        "How a multiple-choice task is scored: cloze (each choice's log-likelihood; the default, learns on "
        "small models) or letter (next-token logits of A/B/C..., the BLoB protocol for 7B-class models).",
        choices=("cloze", "letter"),
    )
    cloze_normalization: str = _opt(
        "mean",
        "Cloze choice score: mean or sum of the continuation's token log-likelihoods.",
        choices=("mean", "sum"),
    )
    # --- adapter ---
    rank: int = _opt(8, "LoRA rank r.")
    alpha: float = _opt(16.0, "LoRA scaling numerator: ΔW is scaled by alpha / rank.")
    dropout: float | None = _opt(None, "Dropout on the adapter input during training (default: mcdropout 0.1, else 0).")
    target_modules: list[str] | None = _opt(
        None,
        "Modules to adapt (names of linear layers); default per architecture (Llama: q_proj v_proj lm_head).",
    )
    # --- Bayesian adapters (melora, blob; blora with --bayesian-core) ---
    prior_std: float | None = _opt(
        None,
        "Prior standard deviation (default: melora 1.0 on each core entry, blob 0.2 on each entry of A).",
        group="posterior",
    )
    sigma_init: float | None = _opt(
        None,
        "Initial posterior std (default: melora 0.1 on each core entry, relative to the core's unit-norm rows; "
        "blob ε = 0.05, σ = G² with G ~ U(ε/√2, ε)).",
        group="posterior",
    )
    core: str = _opt(
        "full",
        "melora: core covariance, full (r² entries) or diag (r entries, ScalaBL).",
        choices=("full", "diag"),
        group="core",
    )
    core_init: str = _opt(
        "identity", "melora: initial core mean M_S.", choices=("identity", "orthogonal"), group="core"
    )
    prior_mean: str = _opt(
        "identity",
        "melora: prior mean of the core (identity pins the B·S·A scale freedom).",
        choices=("identity", "zero"),
        group="core",
    )
    sigma_param: str = _opt("softplus", "melora: σ = softplus(ρ) or exp(ρ).", choices=("softplus", "exp"), group="core")
    kl_schedule: str = _opt(
        "elbo",
        "elbo: loss = mean NLL + β·KL/N_train with β annealed 0→kl_weight over --kl-warmup; blob: the BLoB "
        "paper's recipe (KL stepped by its own SGD with π_i re-weighting).",
        choices=("elbo", "blob"),
        group="posterior",
    )
    kl_weight: float = _opt(1.0, "elbo: final β, the weight of KL/N_train (1 = the ELBO).", group="elbo schedule")
    kl_warmup: float = _opt(
        0.1, "elbo: fraction of the steps over which β grows linearly from 0.", group="elbo schedule"
    )
    sigma_lr: float | None = _opt(
        None,
        "Learning rate of the variance parameters (default: melora 0.05, blob --lr); larger lets σ move.",
        group="posterior",
    )
    kl_lr: float = _opt(0.01, "blob schedule: learning rate of the separate SGD step on π_i·KL.", group="blob schedule")
    blob_gamma: float = _opt(
        8.0, "blob schedule: γ in the cycle length M = 100·N^(π/γ) / batch size.", group="blob schedule"
    )
    # --- B-LoRA (blora) ---
    max_bits: int = _opt(
        16, "blora: largest bit-width of A, B and e (2, 4, 8, 16 or 32; 2 is the floor).", group="gates"
    )
    rank_gate_init: float = _opt(3.0, "blora: initial logit of every rank gate (3: P(on) ≈ 0.99).", group="gates")
    bit_gate_init: float = _opt(3.0, "blora: initial logit of every bit-width gate (3: P(on) ≈ 0.99).", group="gates")
    gate_temperature: float = _opt(2 / 3, "blora: temperature β of the hard-concrete gates.", group="gates")
    gate_lambda: float = _opt(
        0.05, "blora: weight λ of the gates' expected cost (relative to the 16-bit LoRA's) in the loss.", group="gates"
    )
    gate_cost: str = _opt(
        "bops",
        "blora: what a gate costs: bops (its expected bit operations) or gates (1 per gate).",
        choices=("bops", "gates"),
        group="gates",
    )
    gate_lr: float = _opt(
        0.05, "blora: learning rate of the gate logits (they need larger steps than weights).", group="gates"
    )
    gate_warmup: float = _opt(0.1, "blora: fraction of the steps with gates open and nothing quantized.", group="gates")
    gate_fix: float = _opt(
        0.1, "blora: final fraction of the steps with the gates fixed at their chosen values.", group="gates"
    )
    quantize_base: bool = _opt(
        False, "blora: also quantize the frozen weights and input activations (gated).", group="gates"
    )
    base_max_bits: int = _opt(16, "blora: largest bit-width of the frozen weights and activations.", group="gates")
    base_min_bits: int = _opt(
        4,
        "blora: smallest bit-width of the frozen weights and activations (the floor of their quantizers).",
        group="gates",
    )
    bayesian_core: bool = _opt(
        False, "blora: put Me-LoRA's Gaussian r×r core between B and A (calibrated and compressed).", group="gates"
    )
    # --- baselines ---
    ensemble_size: int = _opt(
        3, "ensemble: number of LoRA members (trained with seeds seed, seed + 1, ...).", group="ensemble"
    )
    ensemble_combine: str = _opt(
        "probs",
        "ensemble: average the members' probabilities, or their class scores (logits, as the BLoB code does).",
        choices=("probs", "logits"),
        group="ensemble",
    )
    laplace_subset: str = _opt(
        "all",
        "laplace: the LoRA weights under the posterior: all of them, or the last adapted module's (last-layer).",
        choices=("all", "last"),
        group="laplace",
    )
    laplace_prior: str = _opt(
        "auto",
        "laplace: prior precision chosen by the NLL on held-out training examples (heldout: needs --train-size "
        "below the training split's size) or by the Laplace marginal likelihood (marglik); auto: heldout when at "
        "least 50 training examples are left unused, else marglik with a warning.",
        choices=("auto", "marglik", "heldout"),
        group="laplace",
    )
    laplace_predictive: str = _opt(
        "glm",
        "laplace: the linearised predictive (glm; exact Gaussian over class scores) or N sampled networks (nn).",
        choices=("glm", "nn"),
        group="laplace",
    )
    # --- training ---
    max_steps: int | None = _opt(None, "Optimizer steps; overrides --epochs when set.")
    epochs: float = _opt(1.0, "Passes over the training set (used when --max-steps is not set).")
    batch_size: int = _opt(8, "Examples (questions) per optimizer step and device, before accumulation.")
    grad_accum: int = _opt(1, "Gradient accumulation steps.")
    lr: float = _opt(1e-4, "Peak learning rate of AdamW (linear warm-up, then linear decay to 0).")
    weight_decay: float | None = _opt(None, "AdamW weight decay (default: map 1e-5, every other method 0).")
    warmup_ratio: float = _opt(0.06, "Fraction of the steps spent warming the learning rate up.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm.")
    train_size: int | None = _opt(None, "Train on a fixed seeded subsample of this many examples.")
    max_length: int = _opt(512, "Longest token sequence; longer prompts lose their beginning (with a warning).")
    seed: int = _opt(1, "Random seed (adapter initialisation, data order, posterior samples).")
    # --- evaluation ---
    eval_tasks: list[str] | None = _opt(
        None,
        "Tasks to evaluate on after training (default: the training task, when it has an evaluation split).",
    )
    samples: int | None = _opt(
        None, "Posterior samples averaged at evaluation (default: the method's; 1 for deterministic methods)."
    )
    eval_batch_size: int = _opt(16, "Examples per evaluation batch.")
    limit: int | None = _opt(None, "Evaluate on a fixed seeded subsample of this many examples.")
    # --- system ---
    output_dir: str | None = _opt(None, "Run directory (default: runs/<task>-<method>-seed<seed>).")
    overwrite: bool = _opt(False, "Replace an existing run directory (it is kept until the new run succeeds).")
    save_steps: int | None = _opt(None, "Save a training checkpoint every N optimizer steps (in <run>/checkpoints).")
    save_total_limit: int = _opt(2, "Checkpoints kept (the oldest are deleted).")
    resume: bool = _opt(
        False,
        "Continue the unfinished run in --output-dir from its last checkpoint (an ensemble: after its last "
        "finished member), as it was configured (options you give must agree with its config.yaml).",
    )
    num_layers: int | None = _opt(None, "Keep only the first N transformer blocks (quick experiments, tests).")
    dtype: str = _opt(
        "auto",
        "Dtype of the frozen base: auto (bf16 on GPU; on CPU the faster of fp32 and bf16, measured once per machine), "
        "float32, bfloat16 or float16. Adapters, the loss and metrics are fp32 whatever it is.",
    )
    load_in_4bit: bool = _opt(False, "Load the frozen base in 4 bits (bitsandbytes NF4, QLoRA style; runs on CPU too).")
    load_in_8bit: bool = _opt(False, "Load the frozen base in 8 bits (bitsandbytes LLM.int8()).")
    report_to: list[str] = _opt(["none"], "Trainer logging integrations (tensorboard, wandb, ...), or none.")
    logging_steps: int = _opt(10, "Log the training loss every N steps.")
    trust_remote_code: bool = _opt(False, "Allow models whose code lives on the Hub (off: only trusted code runs).")
    force_base: bool = _opt(
        False, "Load a saved adapter even onto a base model other than the one it was trained on (not advised)."
    )

    def resolved_output_dir(self) -> Path:
        """The run directory: ``output_dir``, else ``runs/<task>-<method>-seed<seed>``."""
        if self.output_dir:
            return Path(self.output_dir)
        task = Path(self.task).stem if self.task.endswith(".jsonl") else self.task.replace(":", "-").replace("/", "-")
        return Path("runs") / f"{task}-{self.method}-seed{self.seed}"

    def validate(self) -> None:
        """Raise ``ValueError`` naming every option that is out of range, and how to fix it."""
        problems = []
        if self.rank <= 0:
            problems.append(f"--rank must be a positive integer, got {self.rank}")
        if self.alpha <= 0:
            problems.append(f"--alpha must be positive, got {self.alpha}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            problems.append(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.ensemble_size < 1:
            problems.append(f"--ensemble-size must be at least 1, got {self.ensemble_size}")
        if self.max_steps is not None and self.max_steps <= 0:
            problems.append(f"--max-steps must be positive, got {self.max_steps}")
        if self.epochs <= 0:
            problems.append(f"--epochs must be positive, got {self.epochs}")
        for name in ("batch_size", "grad_accum", "eval_batch_size", "logging_steps", "max_length"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.weight_decay is not None and self.weight_decay < 0:
            problems.append(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.lr <= 0:
            problems.append(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.samples is not None and self.samples < 0:
            problems.append(f"--samples must be >= 0 (0 = posterior mean), got {self.samples}")
        if self.save_steps is not None and self.save_steps <= 0:
            problems.append(f"--save-steps must be positive, got {self.save_steps}")
        if self.save_total_limit <= 0:
            problems.append(f"--save-total-limit must be positive, got {self.save_total_limit}")
        if self.resume and self.overwrite:
            problems.append("--resume continues a run and --overwrite replaces it: choose one")
        for name in ("train_size", "limit", "num_layers"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.prior_std is not None and self.prior_std <= 0:
            problems.append(f"--prior-std must be positive, got {self.prior_std}")
        if self.sigma_init is not None and self.sigma_init <= 0:
            problems.append(f"--sigma-init must be positive, got {self.sigma_init}")
        if self.sigma_lr is not None and self.sigma_lr <= 0:
            problems.append(f"--sigma-lr must be positive, got {self.sigma_lr}")
        if self.kl_weight < 0:
            problems.append(f"--kl-weight must be >= 0, got {self.kl_weight}")
        if not 0 <= self.kl_warmup <= 1:
            problems.append(f"--kl-warmup must be in [0, 1], got {self.kl_warmup}")
        if self.kl_lr <= 0 or self.blob_gamma <= 0:
            problems.append("--kl-lr and --blob-gamma must be positive")
        for name in (
            "scoring",
            "cloze_normalization",
            "core",
            "core_init",
            "prior_mean",
            "sigma_param",
            "kl_schedule",
            "gate_cost",
            "ensemble_combine",
            "laplace_subset",
            "laplace_prior",
            "laplace_predictive",
        ):
            choices = _choices(name)
            value = getattr(self, name)
            if value is not None and value not in choices:
                problems.append(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got '{value}'")
        for name in ("max_bits", "base_max_bits", "base_min_bits"):
            if getattr(self, name) not in (2, 4, 8, 16, 32):
                problems.append(f"--{name.replace('_', '-')} must be 2, 4, 8, 16 or 32, got {getattr(self, name)}")
        if self.base_min_bits > self.base_max_bits:
            problems.append(
                f"--base-min-bits ({self.base_min_bits}) must not exceed --base-max-bits ({self.base_max_bits})"
            )
        if self.gate_temperature <= 0 or self.gate_lr <= 0 or self.gate_lambda < 0:
            problems.append("--gate-temperature and --gate-lr must be positive, --gate-lambda >= 0")
        if not (self.gate_warmup >= 0 and self.gate_fix >= 0 and self.gate_warmup + self.gate_fix < 1):
            problems.append(
                f"--gate-warmup ({self.gate_warmup}) and --gate-fix ({self.gate_fix}) must be >= 0 and sum to less "
                f"than 1, leaving steps in which the gates learn"
            )
        if self.load_in_4bit and self.load_in_8bit:
            problems.append("--load-in-4bit and --load-in-8bit exclude each other: choose one")
        if self.quantize_base and (self.load_in_4bit or self.load_in_8bit):
            problems.append(
                "--quantize-base learns a quantization of a float base; the base is already quantized by "
                "bitsandbytes (--load-in-4bit/8bit): use one or the other"
            )
        if self.target_modules is not None and not self.target_modules:
            problems.append("--target-modules is empty")
        if problems:
            raise ValueError("Invalid configuration:\n  - " + "\n  - ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choices(name: str) -> tuple[str, ...]:
    return next(f.metadata.get("choices", ()) for f in dataclasses.fields(RunConfig) if f.name == name)


def field_type(f: dataclasses.Field) -> tuple[type, bool, bool]:
    """(scalar type, is_list, is_optional) of a RunConfig field."""
    hint = typing.get_type_hints(RunConfig)[f.name]
    optional = False
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        optional = True
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True, optional
    return hint, False, optional


def coerce_value(name: str, value: Any) -> Any:
    """Check and convert one recipe / flag value to the field's type (``ValueError`` if it does not fit)."""
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    if name not in fields:
        raise ValueError(f"Unknown option '{name}'. Known options: {', '.join(fields)}.")
    scalar, is_list, optional = field_type(fields[name])
    if value is None:
        if optional:
            return None
        raise ValueError(f"Option '{name}' cannot be empty.")
    if is_list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ValueError(f"Option '{name}' must be a list, got {value!r}.")
        return [_coerce_scalar(name, scalar, item) for item in items]
    return _coerce_scalar(name, scalar, value)


def _coerce_scalar(name: str, scalar: type, value: Any) -> Any:
    if scalar is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"Option '{name}' must be true or false, got {value!r}.")
    if scalar is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if scalar is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, scalar) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return scalar(value)
        except ValueError:
            pass
    raise ValueError(f"Option '{name}' must be {scalar.__name__}, got {value!r}.")


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Options from a YAML recipe, checked against :class:`RunConfig` (unknown keys are errors)."""
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"Recipe {path} must be a mapping of option: value, got {type(data).__name__}.")
    return {key: coerce_value(key, value) for key, value in data.items()}


def make_config(recipe: str | Path | None = None, **overrides: Any) -> RunConfig:
    """A validated :class:`RunConfig`: defaults, then the recipe's values, then ``overrides``."""
    values: dict[str, Any] = load_recipe(recipe) if recipe else {}
    values.update({key: coerce_value(key, value) for key, value in overrides.items()})
    config = RunConfig(**values)
    config.validate()
    return config


#: Who uses each group of method-specific options (the ``group`` of a :class:`RunConfig` field); a method declares
#: the groups it uses (:meth:`bayeslora.methods.Method.groups`). Every other option applies to every method.
OPTION_GROUP_USERS: dict[str, str] = {
    "core": "Me-LoRA's Gaussian core (melora, blora --bayesian-core)",
    "posterior": "the variational adapters (melora, blob, blora --bayesian-core)",
    "elbo schedule": "the variational adapters with --kl-schedule elbo",
    "blob schedule": "the variational adapters with --kl-schedule blob",
    "gates": "--method blora",
    "ensemble": "--method ensemble",
    "laplace": "--method laplace",
}


def _option_groups() -> dict[str, tuple[tuple[str, ...], str]]:
    fields = dataclasses.fields(RunConfig)
    return {
        group: (tuple(f.name for f in fields if f.metadata.get("group") == group), users)
        for group, users in OPTION_GROUP_USERS.items()
    }


#: The method-specific options of :class:`RunConfig`, by group: ``(options, who uses them)``.
OPTION_GROUPS: dict[str, tuple[tuple[str, ...], str]] = _option_groups()


def option_users(option: str) -> str | None:
    """Who uses the method-specific ``option`` (from :data:`OPTION_GROUPS`); None for an option of every method."""
    return next((who for options, who in OPTION_GROUPS.values() if option in options), None)
