"""``blora``: B-LoRA, LoRA whose rank and bit-width per matrix are learned by Bayesian gates (Meo et al., 2024; the
tuner: :mod:`bayeslora.tuners.blora`). In the transformers Trainer: the gates' penalty (a loss term) and their
schedule (a callback).

* Penalty: ``λ · E[cost] / cost of the reference``, the prior that favours switching gates off, with
  nested probabilities (a gate counts only together with every gate below it); with ``--gate-budget b`` λ is
  learned by multiplicative dual ascent on "the expected cost is at most ``b`` of the reference"
  (:class:`GateMultiplier`):
  - ``bops`` (default): the expected bit operations of the adapter path (and of the base path when it is
    quantized), relative to the 16-bit LoRA of the same rank (see :mod:`bayeslora.bops`); gates that cost
    more bit operations cost more.
  - ``gates``: the expected number of open gates, relative to the number of gates (c_b = 1 per gate).
  λ = 1 thus weighs "the whole reference cost" like one nat of the mean NLL.
* Schedule: ``open`` for the first ``warmup`` fraction of the steps (gates on, nothing quantized, no
  penalty); at its end the quantizers' ranges are set from the weights as they are then, and gates are
  sampled; in the last ``fix`` fraction the gates are fixed at their evaluation values (no penalty) while
  the weights adapt to the chosen structure.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from ..config import GATE_TRAVEL
from ..io import write_text_atomic
from ..runs.layout import LEGACY_GATE_OPTIONS
from ..training.distributed import world
from ..training.losses import LossTerms
from ..training.trainer import total_steps
from ..tuners.blora import BLoraLayer, BLoraModel
from ..tuners.blora.gates import OFF_THRESHOLD, gate_logit_for
from ..tuners.costs import DEFAULT_BITS, adapter_bops, base_bops, reference_adapter_bops
from .base import Method, TrainingExtras, register_method, shared_options
from .melora import MELORA_DEFAULTS, core_options, resolve_core
from .variational import posterior_options, variational_extras, variational_predictive

GATE_COSTS = ("bops", "gates")


def blora_tuner(model: nn.Module) -> BLoraModel | None:
    """The B-LoRA tuner inside a PEFT model, or None."""
    return next((m for m in model.modules() if isinstance(m, BLoraModel)), None)


def _active(model: nn.Module) -> list[tuple[BLoraLayer, str]]:
    return [
        (layer, adapter)
        for layer in model.modules()
        if isinstance(layer, BLoraLayer)
        for adapter in layer.active_adapters
        if layer._has(adapter)
    ]


def expected_rank_squared(layer: BLoraLayer, adapter: str) -> Tensor:
    """E[r'²] = 1 + Σ_k (2k + 1)·P_k, P_k = Π_{j≤k} P(z_j ≠ 0): with nested gates M_j·M_k = M_max(j,k)."""
    from ..tuners.blora.gates import nested, prob_nonzero

    logits = layer.blora_rank[adapter]
    kept = nested(prob_nonzero(logits, layer.gate_temperature[adapter]))  # (r - 1,)
    k = torch.arange(1, kept.shape[0] + 1, device=kept.device, dtype=kept.dtype)
    return 1 + ((2 * k + 1) * kept).sum()


def expected_bops(layer: BLoraLayer, adapter: str) -> tuple[Tensor, float]:
    """``(E[BOPs], reference BOPs)`` per token of one layer: the adapter path, plus the base path when this
    adapter quantizes it (otherwise the base is a constant and left out of both)."""
    n, m = layer.in_features, layer.out_features
    quantize_base = layer.quantize_base[adapter]
    x_bits = layer.expected_bits("x", adapter) if quantize_base else DEFAULT_BITS
    core = layer.core[adapter] if layer.bayesian_core[adapter] else None
    cost = adapter_bops(
        n,
        m,
        layer.expected_rank(adapter),
        layer.expected_bits("A", adapter),
        layer.expected_bits("B", adapter),
        middle_bits=None if core else layer.expected_bits("e", adapter),
        core=core,
        rank_squared=expected_rank_squared(layer, adapter) if core == "full" else None,
        activation_bits=x_bits,
    )
    reference = reference_adapter_bops(n, m, layer.r[adapter])
    if quantize_base:
        cost = cost + base_bops(n, m, layer.expected_bits("W", adapter), x_bits)
        reference += base_bops(n, m)
    return cost, reference


def expected_cost(model: nn.Module, cost: str = "bops") -> Tensor:
    """E[cost] / reference cost over every active B-LoRA adapter of ``model`` (differentiable in the gate
    logits; 1 when every gate is surely on and nothing is quantized below the reference)."""
    if cost not in GATE_COSTS:
        raise ValueError(f"unknown gate cost '{cost}': {', '.join(GATE_COSTS)}")
    pairs = _active(model)
    if not pairs:
        raise ValueError("the model has no B-LoRA layers")
    if (tuner := blora_tuner(model)) is not None:
        tuner.mark_regularised()  # the gates' prior is in the loss: no warning about training without it
    if cost == "gates":
        terms = [layer.expected_open_gates(adapter) for layer, adapter in pairs]
        return sum(t for t, _ in terms) / sum(count for _, count in terms)
    terms = [expected_bops(layer, adapter) for layer, adapter in pairs]
    return sum(t for t, _ in terms) / sum(ref for _, ref in terms)


def structure_bops(layer: BLoraLayer, adapter: str) -> tuple[float, float]:
    """``(BOPs, reference BOPs)`` per token of one layer as it is evaluated and exported (deterministic gates; the
    base path included when this adapter quantizes it): what :func:`expected_bops` is the expectation of."""
    structure = layer.adapter_structure(adapter)
    n, m = layer.in_features, layer.out_features
    x_bits = structure.bits.get("x", DEFAULT_BITS)
    cost = adapter_bops(
        n,
        m,
        structure.rank,
        structure.bits["A"],
        structure.bits["B"],
        middle_bits=structure.middle_bits,
        core=structure.core,
        activation_bits=x_bits,
    )
    reference = reference_adapter_bops(n, m, layer.r[adapter])
    if layer.quantize_base[adapter]:
        cost += base_bops(n, m, structure.bits["W"], x_bits)
        reference += base_bops(n, m)
    return float(cost), float(reference)


@torch.no_grad()
def structure_cost(model: nn.Module, cost: str = "bops") -> float:
    """The cost of the structure the adapter is evaluated and exported with (every gate decided: on when
    P(z = 0) < 0.34) relative to the reference, the deterministic counterpart of :func:`expected_cost`: bit
    operations (``bops``) or gates on, each counted only with every gate below it on (``gates``)."""
    from ..tuners.blora.gates import deterministic_gates, prefix_length

    if cost not in GATE_COSTS:
        raise ValueError(f"unknown gate cost '{cost}': {', '.join(GATE_COSTS)}")
    pairs = _active(model)
    if not pairs:
        raise ValueError("the model has no B-LoRA layers")
    if cost == "bops":
        terms = [structure_bops(layer, adapter) for layer, adapter in pairs]
        return sum(t for t, _ in terms) / sum(ref for _, ref in terms)
    on = total = 0
    for layer, adapter in pairs:
        chains = [layer.blora_rank[adapter]] + [
            getattr(layer, f"blora_{t}_bits")[adapter] for t in layer.quantized_tensors(adapter)
        ]
        for chain in chains:
            on += prefix_length(deterministic_gates(chain, layer.gate_temperature[adapter]))
            total += chain.numel()
    return on / total


@torch.no_grad()
def structure_summary(model: nn.Module) -> dict[str, float]:
    """Mean learned rank and bits of the evaluation-time structure, and the expected-BOPs ratio."""
    pairs = _active(model)
    ranks = [layer.learned_rank(adapter) for layer, adapter in pairs]
    bits: dict[str, list[int]] = {}
    for layer, adapter in pairs:
        for name, value in layer.learned_bits(adapter).items():
            bits.setdefault(name, []).append(value)
    summary = {"rank": sum(ranks) / len(ranks)}
    summary.update({f"bits_{name}": sum(values) / len(values) for name, values in bits.items()})
    return summary


class GatePenalty:
    """The extra loss ``λ·E[cost]/reference`` (an :data:`~bayeslora.training.ExtraLoss`), the prior that favours
    switching gates off; under a budget λ is the :class:`GateMultiplier`'s. In the open and fixed phases it is only
    logged: the gates are not in play then."""

    def __init__(self, weight: float, cost: str = "bops", multiplier: GateMultiplier | None = None) -> None:
        if weight < 0:
            raise ValueError(f"the gate penalty weight must be >= 0, got {weight}")
        if cost not in GATE_COSTS:
            raise ValueError(f"unknown gate cost '{cost}': {', '.join(GATE_COSTS)}")
        self.weight = weight
        self.cost = cost
        self.multiplier = multiplier

    def __call__(self, model: nn.Module, trainer) -> LossTerms:
        ratio = expected_cost(model, self.cost)
        tuner = blora_tuner(model)
        phase = tuner.bayesian_layers()[0].phase if tuner is not None else "sample"
        logs = {f"expected_{self.cost}_ratio": float(ratio.detach()), **structure_summary(model)}
        weight = self.weight
        if self.multiplier is not None:
            weight = self.multiplier.value
            logs.update(gate_multiplier=weight, **{f"structure_{self.cost}_ratio": structure_cost(model, self.cost)})
        if phase != "sample":
            return LossTerms(logs=logs)
        return LossTerms(terms={"gate_cost": weight * ratio}, logs=logs)


#: Under a budget the multiplier moves geometrically within [--gate-lambda / RANGE, --gate-lambda · RANGE], and could
#: cross that whole range in one gate phase.
MULTIPLIER_RANGE = 30.0


class GateMultiplier(TrainerCallback):
    """The weight λ of the gates' penalty under a budget b (``--gate-budget``), learned by multiplicative dual ascent
    on the constraint "the expected cost is at most b of the reference":

        log λ_{t+1} = clip(log λ_t + κ·sign(E[c]_t − b), log λ_lo, log λ_hi),   λ_0 = λ_lo,
        λ_lo = λ_scale / R,   λ_hi = λ_scale · R,   κ = log(λ_hi / λ_lo) / n

    with E[c]_t the expected cost (:func:`expected_cost`) after optimizer step t of the gate phase, n that phase's
    steps, λ_scale ``--gate-lambda`` and R :data:`MULTIPLIER_RANGE`. The λ a task needs spans orders of magnitude:
    on SST-2 (MiniLM) the gates fall once λ passes ~0.008, and under Adam they fall together, at the full gate
    learning rate, so any λ much past that threshold takes the structure far below the budget (0.1x at λ 0.035);
    on SmolLM2's ARC-Easy λ 0.07 still left the expected cost at 0.35. A geometric climb spends as long in each
    decade, so it comes upon a small threshold slowly and still reaches a large one within the phase; it falls
    again within the budget. The expectation answers at once to the gates' logits, where the decided structure
    moves only once a gate crosses its threshold. The decided structure can cost more or less than the expectation
    (a gate at P(on) = 0.7 counts 0.7 in it and 1 once decided, one at 0.6 counts 0.6 and 0); in the benchmark's
    runs it cost less. λ is saved in every checkpoint and restored when a run resumes from one."""

    FILE = "gate_multiplier.json"

    def __init__(self, budget: float, scale: float, steps: int, cost: str = "bops") -> None:
        if budget <= 0:
            raise ValueError(f"the gate budget must be > 0 (a fraction of the reference cost), got {budget}")
        if scale <= 0:
            raise ValueError(f"a gate budget needs --gate-lambda > 0 (the scale of its multiplier), got {scale}")
        self.budget, self.cost = budget, cost
        self.low, self.high = scale / MULTIPLIER_RANGE, scale * MULTIPLIER_RANGE
        self.rate = math.log(self.high / self.low) / max(1, steps)  # κ
        self.value = self.low
        self._restored = False

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if self._restored:
            return
        self._restored = True  # the first step: of a resumed run, the Trainer has restored its checkpoint's step
        saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.FILE
        if state.global_step > 0 and saved.is_file():
            self.value = float(json.loads(saved.read_text())["multiplier"])
        elif state.global_step > 0:  # a process killed between saving the checkpoint and this file
            warnings.warn(
                f"--gate-budget: {saved} is missing (the run stopped while that checkpoint was being saved), so the "
                f"penalty's multiplier starts again at {self.value:.3g}; the run will not match an uninterrupted one. "
                f"For an exact continuation delete {saved.parent} and resume from the checkpoint before it.",
                UserWarning,
                stacklevel=2,
            )

    def on_step_end(self, args, state, control, model=None, **kwargs) -> None:
        tuner = blora_tuner(model)
        if tuner is None or tuner.bayesian_layers()[0].phase != "sample":
            return
        with torch.no_grad():
            over = float(expected_cost(model, self.cost)) > self.budget
        moved = self.value * math.exp(self.rate if over else -self.rate)
        self.value = min(self.high, max(self.low, moved))

    def on_save(self, args, state, control, **kwargs) -> None:
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            write_text_atomic(checkpoint / self.FILE, json.dumps({"multiplier": self.value}) + "\n")


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable gate logits (rank and bit-width gates) of every B-LoRA layer."""
    found: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, BLoraLayer):
            for name in module.gate_parameter_names:
                found += [p for p in getattr(module, name).parameters() if p.requires_grad]
    return found


class GateSchedule(TrainerCallback):
    """Open gates for the first ``warmup`` fraction of the optimizer steps, sampled gates after, fixed gates
    for the last ``fix`` fraction; the quantizers' ranges are set from the weights when quantization starts."""

    def __init__(self, warmup: float = 0.1, fix: float = 0.0, range_width: float = 0.1) -> None:
        if not (warmup >= 0 and fix >= 0 and warmup + fix < 1):
            raise ValueError(f"gate warm-up ({warmup}) and fixed phase ({fix}) must be >= 0 and leave steps between")
        self.warmup = warmup
        self.fix = fix
        self.range_width = range_width

    def warmup_steps(self, max_steps: int) -> int:
        """How many optimizer steps the open phase lasts."""
        return math.ceil(self.warmup * max_steps)

    def phase_at(self, step: int, max_steps: int) -> str:
        """The phase of optimizer step ``step`` (0-based) of ``max_steps``."""
        if step < self.warmup_steps(max_steps):
            return "open"
        if self.fix > 0 and step >= max_steps - math.ceil(self.fix * max_steps):
            return "fixed"
        return "sample"

    def _enter(self, model: nn.Module, phase: str, calibrate: bool = False) -> None:
        """Put the model's B-LoRA layers in ``phase``. If this leaves the open phase and ``calibrate`` is set,
        first set every quantizer's range from the weights as they are (quantization starts here)."""
        tuner = blora_tuner(model)
        if tuner is None:
            return
        layers = tuner.bayesian_layers()
        if calibrate and layers and layers[0].phase == "open" and phase != "open":
            for layer in layers:
                for adapter in layer.active_adapters:
                    if layer._has(adapter):
                        layer.calibrate_ranges(adapter, self.range_width)
        tuner.set_gate_phase(phase)

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        # the Trainer calls this before it restores a checkpoint's step: the step hook sets the right phase
        self._enter(model, self.phase_at(state.global_step, state.max_steps))

    def on_step_begin(self, args, state, control, model=None, **kwargs) -> None:
        # quantization starts at exactly the warm-up boundary; a run resumed later keeps its checkpoint's ranges
        starts = state.global_step == self.warmup_steps(state.max_steps)
        self._enter(model, self.phase_at(state.global_step, state.max_steps), calibrate=starts)

    def on_train_end(self, args, state, control, model=None, **kwargs) -> None:
        # what is saved and evaluated: deterministic gates, quantized (ranges set now if never set)
        self._enter(model, "sample", calibrate=True)


def gate_steps(schedule: GateSchedule, total_steps: int) -> int:
    """The optimizer steps in which the gate logits train: the sampled phase of ``schedule``."""
    return sum(schedule.phase_at(step, total_steps) == "sample" for step in range(total_steps))


def switch_off_distance(initial_logit: float, temperature: float) -> float:
    """How far a gate logit must fall from ``initial_logit`` for the gate to be off at evaluation (P(z = 0) ≥ 0.34)."""
    return initial_logit - gate_logit_for(1 - OFF_THRESHOLD, temperature)


def derived_gate_lr(steps: int, distance: float, travel: float) -> float:
    """The gate learning rate of a run whose gates train for ``steps`` optimizer steps (``--gate-lr`` unset): Adam
    moves a parameter by about its learning rate per step, so a logit can travel ≈ gate_lr·steps, and

        gate_lr = travel · distance / steps

    lets it go ``travel`` times the ``distance`` to switch off: the same freedom for a gate in a run of 100 steps
    as in one of 10,000 (a fixed rate left the gates of short runs all on, and lets those of long runs flip
    back and forth)."""
    return travel * distance / max(1, steps)


def warn_if_gates_cannot_close(
    schedule: GateSchedule, total_steps: int, gate_lr: float, initial_logit: float, temperature: float
) -> str | None:
    """Warn (and return the message) when a run is too short for any gate to switch off at the ``gate_lr`` given.

    Gate logits train only in the sampled phase of ``schedule``, ``n`` of the ``total_steps``. Adam moves a
    parameter by about its learning rate per step, so a logit travels at most ≈ ``gate_lr · n``; a gate is off
    at evaluation once its logit is below ``gate_logit_for(1 − 0.34)`` (P(z = 0) ≥ 0.34). The warning fires
    when that travel is less than twice the distance: the penalty would have to outweigh the data on nearly
    every step for a gate to get there.
    """
    steps = gate_steps(schedule, total_steps)
    distance = switch_off_distance(initial_logit, temperature)
    travel = gate_lr * steps
    if travel >= 2 * distance:
        return None
    message = (
        f"B-LoRA: the gates train for {steps} optimizer steps at --gate-lr {gate_lr:g}; a gate logit moves "
        f"about the learning rate per step, at most ~{travel:.1f} in all, and switching a gate off from its "
        f"initial logit {initial_logit:g} takes {distance:.1f}. The gates will probably all stay on (no "
        f"compression): train for more steps (--epochs, --max-steps), raise --gate-lr, or leave it unset (it is "
        f"then derived from the run's length, --gate-travel)."
    )
    warnings.warn(message, UserWarning, stacklevel=2)
    return message


class BLora(Method):
    """ΔW = s·Q(B)·diag(m ⊙ Q(e))·Q(A), or with ``--bayesian-core`` Me-LoRA's Gaussian core in the middle (then it
    is also a variational adapter: KL term, posterior samples at evaluation)."""

    name = "blora"
    description = "B-LoRA: rank and bit-width of every matrix learned by hard-concrete gates (Bayesian Bits quantizer)"
    peft_type = "BLORA"
    option_defaults = MELORA_DEFAULTS
    default_samples = 10
    learns_structure = True

    def groups(self, config) -> tuple[str, ...]:
        return ("gates", "core", "posterior") if config.bayesian_core else ("gates",)

    def resolve(self, config):
        return resolve_core(super().resolve(config))

    def options_from_adapter(self, peft_config) -> dict:
        return {"bayesian_core": peft_config.bayesian_core}

    def is_stochastic(self, config) -> bool:
        return config.bayesian_core  # a Bayesian core's predictions average samples

    def predictive(self, config, n_samples: int, run_dir=None) -> dict:
        return variational_predictive(config, n_samples) if config.bayesian_core else {}

    def predictive_record(self, config) -> dict:
        if not config.bayesian_core:
            return {}
        return {"posterior_predictive": config.posterior_predictive, "sample_layers": config.sample_layers}

    def peft_config(self, config, targets: list[str], task_type: str, total_steps: int):
        from ..tuners import BLoraConfig

        return BLoraConfig(
            **shared_options(config, targets, task_type),
            bayesian_core=config.bayesian_core,
            max_bits=config.max_bits,
            rank_gate_init=config.rank_gate_init,
            bit_gate_init=config.bit_gate_init,
            gate_temperature=config.gate_temperature,
            quantize_base=config.quantize_base,
            base_max_bits=config.base_max_bits,
            base_min_bits=config.base_min_bits,
            **core_options(config),
            **posterior_options(config),
        )

    def training_extras(self, model: nn.Module, config, n_train: int) -> TrainingExtras:
        """The gates' penalty, schedule and learning rate (after warning when they cannot close in the run's steps),
        and a Bayesian core's KL."""
        schedule = GateSchedule(config.gate_warmup, config.gate_fix)
        initial_logit = min(config.rank_gate_init, config.bit_gate_init)
        steps = total_steps(config, n_train, processes=world()[1])
        if config.gate_lr is None:
            distance = switch_off_distance(initial_logit, config.gate_temperature)
            gate_lr = derived_gate_lr(gate_steps(schedule, steps), distance, config.gate_travel)
        else:
            gate_lr = config.gate_lr
            if config.gate_travel not in (GATE_TRAVEL, LEGACY_GATE_OPTIONS["gate_travel"]):  # given, not a default
                warnings.warn(
                    f"--gate-travel {config.gate_travel:g} is ignored: --gate-lr {gate_lr:g} sets the gates' learning "
                    f"rate (leave --gate-lr out to derive it from --gate-travel).",
                    UserWarning,
                    stacklevel=2,
                )
            warn_if_gates_cannot_close(schedule, steps, gate_lr, initial_logit, config.gate_temperature)
        extras = variational_extras(model, config, n_train) if config.bayesian_core else TrainingExtras()
        callbacks: list[TrainerCallback] = [schedule]
        multiplier = None
        if config.gate_budget is not None:
            multiplier = GateMultiplier(
                config.gate_budget, config.gate_lambda, gate_steps(schedule, steps), config.gate_cost
            )
            callbacks.append(multiplier)
        return extras + TrainingExtras(
            losses=[GatePenalty(config.gate_lambda, config.gate_cost, multiplier)],
            callbacks=callbacks,
            special_lrs=[(gate_parameters(model), gate_lr)],
        )


METHOD = register_method(BLora())
