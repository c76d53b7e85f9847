"""The run configuration: every option declared once, as a field of :class:`RunConfig`.

A field carries its default, its help, its choices, the range of values it allows and the section or method
group it belongs to; from that one declaration come the CLI flag (``--batch-size``, in its group of
``bayeslora train --help`` with its default), the key of a YAML recipe (``batch_size: 8``), the entry of the
``config.yaml`` a run keeps to be reproduced, and the validation of every value. Options of a PEFT tuner (Me-LoRA's
core, B-LoRA's gates) take their default, help and choices from the tuner's config (:func:`_tuner_option`).
Precedence: defaults < recipe < flags.

The CLI is built here rather than with ``transformers.HfArgumentParser``, which also turns dataclass fields into
flags: bayeslora's flags default to "not given" so that a recipe can sit between the defaults and the flags, a
YAML recipe is checked and coerced by the same rules as a flag, and the help groups the options by method. The
parser itself is :mod:`argparse`, generated from these fields.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import read_yaml
from .runs.layout import CONFIG_HEADER, with_legacy_defaults
from .tuners.base import LowRankBayesConfig
from .tuners.blocks import parse_bayesian_layers
from .tuners.blora.config import BLoraConfig
from .tuners.melora.config import MeLoraCoreOptions

#: The sections of the options every method shares, in the order ``--help`` shows them.
SECTIONS = ("what to train", "adapter", "training", "evaluation", "system")

#: B-LoRA's default --gate-travel, with :data:`GATE_BUDGET`: chosen on held-out training questions by
#: benchmarks/compression.py (results/compression/gates.md) among travel 2, 4 and 8, with and without a budget and a
#: 5x weaker --gate-lambda: the only setting at <= 0.3x LoRA's adapter bit operations with held-out accuracy within one
#: standard error of LoRA's on SST-2 (MiniLM), ARC-Easy and OBQA (SmolLM2) (three seeds each for it, travel 4 and
#: travel 8 without a budget; one seed on ARC-Easy and OBQA for the others, each of which missed there).
GATE_TRAVEL = 8.0

#: B-LoRA's default --gate-budget (see :data:`GATE_TRAVEL`): without one, travel 8 cut SST-2 to 0.027x the bit
#: operations and 4.8 points below LoRA; with it, 0.118x at 1.3 points below.
GATE_BUDGET = 0.25


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

#: The ranges an option may declare (``check``), as (test, what the error says).
_CHECKS: dict[str, tuple[Any, str]] = {
    "> 0": (lambda v: v > 0, "positive"),
    ">= 0": (lambda v: v >= 0, ">= 0"),
    ">= 1": (lambda v: v >= 1, "at least 1"),
    "[0, 1)": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "[0, 1]": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}


def _opt(
    default: Any,
    help: str,
    *,
    section: str | None = None,
    group: str | None = None,
    choices: tuple | None = None,
    check: str | None = None,
) -> Any:
    """A :class:`RunConfig` field: its default and help; ``section`` (:data:`SECTIONS`) for an option of every
    method, or ``group`` (:data:`OPTION_GROUP_USERS`) for a method-specific one; the allowed ``choices``; ``check``,
    the range of values (:data:`_CHECKS`; None is always allowed for an optional option)."""
    if (section is None) == (group is None):
        raise ValueError("an option belongs to exactly one section or method group")
    if check is not None and check not in _CHECKS:
        raise ValueError(f"unknown check {check!r}: {', '.join(_CHECKS)}")
    metadata = {"help": help, "section": section, "group": group, "choices": choices, "check": check}
    metadata = {key: value for key, value in metadata.items() if value is not None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _tuner_option(config_cls: type, name: str, *, group: str, help: str | None = None, **overrides: Any) -> Any:
    """A :class:`RunConfig` field declared by a tuner's config: its default, help and choices come from the field
    ``name`` of ``config_cls`` (``help`` and ``overrides`` replace them where the run option differs)."""
    source = next(f for f in dataclasses.fields(config_cls) if f.name == name)
    options = {"choices": source.metadata.get("choices"), "check": source.metadata.get("check"), **overrides}
    default = options.pop("default", source.default)
    return _opt(default, help or source.metadata["help"], group=group, **options)


@dataclass
class RunConfig:
    """Everything that defines a fine-tuning run; ``config.yaml`` in a run directory is this, resolved."""

    # --- what to train ---
    model: str = _opt(
        "smollm2-135m",
        "Base model: built-in alias (smollm2-135m, minilm-l6), local folder or HF id.",
        section="what to train",
    )
    task: str = _opt(
        "arc-easy",
        "Training task: registry name (see `bayeslora tasks`), local .jsonl file or hf:<id>.",
        section="what to train",
    )
    method: str = _opt("lora", "Adapter method (see `bayeslora methods`).", section="what to train")
    scoring: str | None = _opt(
        None,
        "How a multiple-choice task is scored: cloze (each choice's log-likelihood; the default, learns on "
        "small models) or letter (next-token logits of A/B/C..., the BLoB protocol for 7B-class models).",
        section="what to train",
        choices=("cloze", "letter"),
    )
    chat_template: bool = _opt(
        False,
        "Put prompts through the tokenizer's chat template (instruct models): a multiple-choice question as a user "
        "turn whose choices are the assistant's reply (cloze scoring); plain prompt/completion rows as a user turn "
        "and the assistant's reply (chat rows always are).",
        section="what to train",
    )
    cloze_normalization: str = _opt(
        "mean",
        "Cloze choice score: mean or sum of the continuation's token log-likelihoods.",
        section="what to train",
        choices=("mean", "sum"),
    )
    # --- adapter ---
    rank: int = _opt(8, "LoRA rank r.", section="adapter", check="> 0")
    alpha: float = _opt(16.0, "LoRA scaling numerator: ΔW is scaled by alpha / rank.", section="adapter", check="> 0")
    dropout: float | None = _opt(
        None,
        "Dropout on the adapter input during training (default: mcdropout 0.1, else 0).",
        section="adapter",
        check="[0, 1)",
    )
    target_modules: list[str] | None = _opt(
        None,
        "Modules to adapt (names of linear layers); default per architecture (Llama: q_proj v_proj lm_head).",
        section="adapter",
    )
    # --- the variational adapters (melora, blob; blora with --bayesian-core) ---
    prior_std: float | None = _opt(
        None,
        "Prior standard deviation (default: melora 1.0 on each core entry, blob 0.2 on each entry of A).",
        group="posterior",
        check="> 0",
    )
    sigma_init: float | None = _opt(
        None,
        "Initial posterior std (default: melora 0.1 on each core entry, relative to the core's unit-norm rows; "
        "blob ε = 0.05, σ = G² with G ~ U(ε/√2, ε)).",
        group="posterior",
        check="> 0",
    )
    bayesian_layers: str = _tuner_option(
        LowRankBayesConfig,
        "bayesian_layers",
        group="posterior",
        help="Which adapted layers carry the posterior: all, or last:K (the top K blocks and the head, e.g. lm_head; "
        "the adapters below are deterministic, and N posterior samples share one pass through those blocks). "
        "last:0 leaves it in the head only.",
    )
    factor_norm: str = _tuner_option(MeLoraCoreOptions, "factor_norm", group="core")
    core_lr: float | None = _opt(
        None,
        "Learning rate of the core's mean M_S (default: 0.05 with unit factors, else --lr). With unit factors all "
        "of ΔW's scale lives in the r² entries of S, which at --lr grow far slower than LoRA's m·r entries of B.",
        group="core",
        check="> 0",
    )
    core: str = _tuner_option(MeLoraCoreOptions, "core", group="core")
    core_init: str = _tuner_option(MeLoraCoreOptions, "core_init", group="core")
    prior_mean: str | None = _tuner_option(MeLoraCoreOptions, "prior_mean", group="core")
    core_prior: str = _tuner_option(MeLoraCoreOptions, "core_prior", group="core")
    sigma_param: str = _tuner_option(MeLoraCoreOptions, "sigma_param", group="core")
    kl_schedule: str = _opt(
        "elbo",
        "elbo: loss = mean NLL + β·KL/N_train with β annealed 0→kl_weight over --kl-warmup; blob: the BLoB "
        "paper's recipe (KL stepped by its own SGD with π_i re-weighting).",
        group="posterior",
        choices=("elbo", "blob"),
    )
    kl_weight: float = _opt(
        1.0, "Final β, the weight of KL/N_train (1 = the ELBO).", group="elbo schedule", check=">= 0"
    )
    kl_warmup: float = _opt(
        0.1, "Fraction of the steps over which β grows linearly from 0.", group="elbo schedule", check="[0, 1]"
    )
    sigma_lr: float | None = _opt(
        None,
        "Learning rate of the variance parameters (default: melora 0.05, blob --lr); larger lets σ move.",
        group="posterior",
        check="> 0",
    )
    posterior_predictive: str = _opt(
        "samples",
        "How a variational adapter predicts: the mean over --samples posterior samples (samples), or linearised in "
        "the posterior's noise, class scores ~ N(f(mean), J Jᵀ) from one pass and one backward pass per class, "
        "turned into probabilities by 1000 draws (glm) or the probit approximation (probit). Cheapest with the "
        "posterior in the LM head only (--bayesian-layers last:0).",
        group="posterior",
        choices=("samples", "glm", "probit"),
    )
    sample_layers: str = _opt(
        "all",
        "Which of the posterior's layers predictions sample: all, or last:K (those of the top K blocks and the head; "
        "the Bayesian layers below predict with their posterior mean, so N samples share one pass through those "
        "blocks). A cheaper approximation at prediction of a posterior trained with --bayesian-layers all; training "
        "is unchanged.",
        group="posterior",
    )
    kl_lr: float = _opt(0.01, "Learning rate of the separate SGD step on π_i·KL.", group="blob schedule", check="> 0")
    blob_gamma: float = _opt(
        8.0, "γ in the cycle length M = 100·N^(π/γ) / batch size.", group="blob schedule", check="> 0"
    )
    # --- B-LoRA (blora) ---
    max_bits: int = _tuner_option(BLoraConfig, "max_bits", group="gates")
    rank_gate_init: float = _tuner_option(BLoraConfig, "rank_gate_init", group="gates")
    bit_gate_init: float = _tuner_option(BLoraConfig, "bit_gate_init", group="gates")
    gate_temperature: float = _tuner_option(BLoraConfig, "gate_temperature", group="gates", check="> 0")
    gate_lambda: float = _opt(
        0.05,
        "Weight λ of the gates' expected cost (relative to the 16-bit LoRA's) in the loss; under --gate-budget the "
        "scale of the learned weight, which starts at λ / 30 and stays within [λ / 30, 30 λ].",
        group="gates",
        check=">= 0",
    )
    gate_budget: float | None = _opt(
        GATE_BUDGET,
        "Hold the gates' expected cost to this fraction (below 1) of the reference (the 16-bit LoRA's bit "
        "operations, with --quantize-base plus the 16-bit base layer's; every gate with --gate-cost gates): the "
        "penalty's weight is then learned (multiplied up while "
        "over the budget, down within it, between --gate-lambda / 30 and × 30) instead of being --gate-lambda "
        "throughout; none for a fixed --gate-lambda.",
        group="gates",
        check="> 0",
    )
    gate_cost: str = _opt(
        "bops",
        "What a gate costs: bops (its expected bit operations) or gates (1 per gate).",
        group="gates",
        choices=("bops", "gates"),
    )
    gate_lr: float | None = _opt(
        None,
        "Learning rate of the gate logits (default: derived from the run's length, see --gate-travel).",
        group="gates",
        check="> 0",
    )
    gate_travel: float = _opt(
        GATE_TRAVEL,
        "With --gate-lr unset, the gate learning rate is travel × d / n for the n steps in which the gates train, d "
        "the distance from a gate's initial logit to switched off: Adam moves a logit by about its learning rate "
        "per step, so it can travel this many times d in any run's length.",
        group="gates",
        check="> 0",
    )
    gate_warmup: float = _opt(
        0.1,
        "Fraction of the steps with gates open and nothing quantized; > 0, since the quantizers' ranges are set from "
        "the weights trained in it.",
        group="gates",
        check=">= 0",
    )
    gate_fix: float = _opt(
        0.1, "Final fraction of the steps with the gates fixed at their chosen values.", group="gates", check=">= 0"
    )
    quantize_base: bool = _tuner_option(BLoraConfig, "quantize_base", group="gates")
    base_max_bits: int = _tuner_option(BLoraConfig, "base_max_bits", group="gates")
    base_min_bits: int = _tuner_option(BLoraConfig, "base_min_bits", group="gates")
    bayesian_core: bool = _tuner_option(BLoraConfig, "bayesian_core", group="gates")
    # --- baselines ---
    ensemble_size: int = _opt(
        3, "Number of LoRA members (trained with seeds seed, seed + 1, ...).", group="ensemble", check=">= 1"
    )
    ensemble_combine: str = _opt(
        "probs",
        "Average the members' probabilities, or their class scores (logits, as the BLoB code does).",
        group="ensemble",
        choices=("probs", "logits"),
    )
    laplace_subset: str = _opt(
        "all",
        "The LoRA weights under the posterior: all of them, or the last adapted module's (last-layer).",
        group="laplace",
        choices=("all", "last"),
    )
    laplace_prior: str = _opt(
        "auto",
        "Prior precision chosen by the NLL on held-out training examples (heldout: needs --train-size below the "
        "training split's size) or by the Laplace marginal likelihood (marglik); auto: heldout when at least 50 "
        "training examples are left unused, else marglik with a warning.",
        group="laplace",
        choices=("auto", "marglik", "heldout"),
    )
    laplace_predictive: str = _opt(
        "glm",
        "The linearised predictive (glm; exact Gaussian over class scores) or N sampled networks (nn).",
        group="laplace",
        choices=("glm", "nn"),
    )
    # --- training ---
    max_steps: int | None = _opt(None, "Optimizer steps; overrides --epochs when set.", section="training", check="> 0")
    epochs: float = _opt(
        1.0, "Passes over the training set (used when --max-steps is not set).", section="training", check="> 0"
    )
    batch_size: int = _opt(
        8, "Examples (questions) per optimizer step and device, before accumulation.", section="training", check="> 0"
    )
    grad_accum: int = _opt(1, "Gradient accumulation steps.", section="training", check="> 0")
    lr: float = _opt(
        1e-4, "Peak learning rate of AdamW (linear warm-up, then linear decay to 0).", section="training", check="> 0"
    )
    weight_decay: float | None = _opt(
        None, "AdamW weight decay (default: map 1e-5, every other method 0).", section="training", check=">= 0"
    )
    warmup_ratio: float = _opt(
        0.06, "Fraction of the steps spent warming the learning rate up.", section="training", check="[0, 1)"
    )
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm.", section="training")
    train_size: int | None = _opt(
        None, "Train on a fixed seeded subsample of this many examples.", section="training", check="> 0"
    )
    early_stopping: bool = _opt(
        False,
        "Keep the adapter of the epoch with the lowest NLL on held-out training examples the run does not train on "
        "(the 200 after the --train-size subset in its seeded order, those calibrate also fits on); needs "
        "--train-size below the training split's size.",
        section="training",
    )
    early_stopping_patience: int | None = _opt(
        None,
        "With --early-stopping, stop after this many epochs without a lower held-out NLL (default: train every epoch).",
        section="training",
        check="> 0",
    )
    max_length: int = _opt(
        512,
        "Longest token sequence; longer prompts lose their beginning (with a warning).",
        section="training",
        check="> 0",
    )
    seed: int = _opt(1, "Random seed (adapter initialisation, data order, posterior samples).", section="training")
    # --- evaluation ---
    eval_tasks: list[str] | None = _opt(
        None,
        "Tasks to evaluate on after training (default: the training task, when it has an evaluation split).",
        section="evaluation",
    )
    ood_tasks: list[str] | None = _opt(
        None,
        "Tasks evaluated as out of distribution after training: each gets its own eval/<task>/, and the training "
        "task's evaluation records how well the predictive entropy and the mutual information tell them apart "
        "(AUROC).",
        section="evaluation",
    )
    samples: int | None = _opt(
        None,
        "Posterior samples averaged at evaluation (default: the method's; 1 for deterministic methods; 0 = the "
        "posterior mean).",
        section="evaluation",
        check=">= 0",
    )
    eval_batch_size: int = _opt(16, "Examples per evaluation batch.", section="evaluation", check="> 0")
    limit: int | None = _opt(
        None, "Evaluate on a fixed seeded subsample of this many examples.", section="evaluation", check="> 0"
    )
    # --- system ---
    output_dir: str | None = _opt(None, "Run directory (default: runs/<task>-<method>-seed<seed>).", section="system")
    overwrite: bool = _opt(
        False, "Replace an existing run directory (it is kept until the new run succeeds).", section="system"
    )
    save_steps: int | None = _opt(
        None,
        "Save a training checkpoint every N optimizer steps (in <run>/checkpoints).",
        section="system",
        check="> 0",
    )
    save_total_limit: int = _opt(2, "Checkpoints kept (the oldest are deleted).", section="system", check="> 0")
    resume: bool = _opt(
        False,
        "Continue the unfinished run in --output-dir from its last checkpoint (an ensemble: after its last "
        "finished member), as it was configured (options you give must agree with its config.yaml).",
        section="system",
    )
    num_layers: int | None = _opt(
        None, "Keep only the first N transformer blocks (quick experiments, tests).", section="system", check="> 0"
    )
    dtype: str = _opt(
        "auto",
        "Dtype of the frozen base: auto (bf16 on GPU; on CPU the faster of fp32 and bf16, measured once per "
        "machine), float32, bfloat16 or float16. Adapters, the loss and metrics are fp32 whatever it is.",
        section="system",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    load_in_4bit: bool = _opt(
        False, "Load the frozen base in 4 bits (bitsandbytes NF4, QLoRA style; runs on CPU too).", section="system"
    )
    load_in_8bit: bool = _opt(False, "Load the frozen base in 8 bits (bitsandbytes LLM.int8()).", section="system")
    report_to: list[str] = _opt(
        ["none"], "Trainer logging integrations (tensorboard, wandb, ...), or none.", section="system"
    )
    logging_steps: int = _opt(10, "Log the training loss every N steps.", section="system", check="> 0")
    trust_remote_code: bool = _opt(
        False, "Allow models whose code lives on the Hub (off: only trusted code runs).", section="system"
    )
    force_base: bool = _opt(
        False,
        "Load a saved adapter even onto a base model other than the one it was trained on (not advised).",
        section="system",
    )

    def resolved_output_dir(self) -> Path:
        """The run directory: ``output_dir``, else ``runs/<task>-<method>-seed<seed>``."""
        if self.output_dir:
            return Path(self.output_dir)
        task = Path(self.task).stem if self.task.endswith(".jsonl") else self.task.replace(":", "-").replace("/", "-")
        return Path("runs") / f"{task}-{self.method}-seed{self.seed}"

    def validate(self) -> None:
        """Raise ``ValueError`` naming every option that is out of range, and how to fix it: each field's declared
        choices and range, then the rules that tie options together."""
        problems = [problem for f in dataclasses.fields(self) if (problem := _field_problem(f, getattr(self, f.name)))]
        if self.resume and self.overwrite:
            problems.append("--resume continues a run and --overwrite replaces it: choose one")
        if self.base_min_bits > self.base_max_bits:
            problems.append(
                f"--base-min-bits ({self.base_min_bits}) must not exceed --base-max-bits ({self.base_max_bits})"
            )
        if self.gate_budget is not None and self.gate_budget >= 1:
            problems.append(
                f"--gate-budget {self.gate_budget:g} is a fraction of the reference cost (the 16-bit LoRA's bit "
                "operations, with --quantize-base plus the 16-bit base layer's; every gate with --gate-cost gates) "
                "that the gates already meet with every gate on: it "
                f"never binds. Give a fraction below 1 (default {GATE_BUDGET:g}), or --gate-budget none for the fixed "
                "--gate-lambda"
            )
        if self.method == "blora" and self.gate_budget is not None and self.gate_lambda == 0:
            problems.append(
                f"--gate-lambda 0 with --gate-budget {self.gate_budget:g}: under a budget --gate-lambda is the scale "
                "of the learned penalty weight, which must be > 0. For no penalty give --gate-budget none as well"
            )
        if self.gate_warmup == 0:
            problems.append(
                "--gate-warmup 0 would quantize from the first step, setting each quantizer's range from the untrained "
                "weights: B starts at zero, so its range would be the narrowest one ([-0.05, 0.05]), capping B there "
                "(no gradient reaches B past its range). Give the warm-up a fraction > 0 (default 0.1): its end sets "
                "the ranges from the trained weights"
            )
        if self.gate_warmup + self.gate_fix >= 1:
            problems.append(
                f"--gate-warmup ({self.gate_warmup}) and --gate-fix ({self.gate_fix}) must sum to less than 1, "
                f"leaving steps in which the gates learn"
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
        for option in ("bayesian_layers", "sample_layers"):
            try:
                parse_bayesian_layers(getattr(self, option), option)
            except ValueError as error:
                problems.append(f"--{str(error).replace('_', '-', 1)}")
        if problems:
            raise ValueError("Invalid configuration:\n  - " + "\n  - ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def flag(name: str) -> str:
    """The CLI flag of option ``name``: ``--batch-size`` for ``batch_size``."""
    return "--" + name.replace("_", "-")


def _field_problem(f: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with ``value`` for the option ``f`` (its declared choices and range), or None."""
    if value is None:
        return None
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        shown = ", ".join(map(str, choices))
        return f"{flag(f.name)} must be one of {shown}, got {value!r}"
    check = f.metadata.get("check")
    if check is not None:
        test, allowed = _CHECKS[check]
        if not test(value):
            if allowed == "positive" and isinstance(value, int) and not isinstance(value, bool):
                allowed = "a positive integer"
            return f"{flag(f.name)} must be {allowed}, got {value}"
    return None


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
    if optional and isinstance(value, str) and value.strip().lower() in ("none", "null"):
        value = None  # `--gate-budget none` on the command line: the option unset
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
    """Options from a YAML recipe, checked against :class:`RunConfig` (unknown keys are errors). A run's
    ``config.yaml`` (written by bayeslora) is read as the version that wrote it meant it
    (:func:`~bayeslora.runs.layout.with_legacy_defaults`)."""
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"Recipe {path} must be a mapping of option: value, got {type(data).__name__}.")
    if Path(path).read_text(encoding="utf-8").startswith(CONFIG_HEADER):
        data = with_legacy_defaults(data)
    return {key: coerce_value(key, value) for key, value in data.items()}


def make_config(recipe: str | Path | None = None, **overrides: Any) -> RunConfig:
    """A validated :class:`RunConfig`: defaults, then the recipe's values, then ``overrides``."""
    values: dict[str, Any] = load_recipe(recipe) if recipe else {}
    values.update({key: coerce_value(key, value) for key, value in overrides.items()})
    config = RunConfig(**values)
    config.validate()
    return config
