"""``adalora``: PEFT's AdaLoRA, and what it needs in the Trainer: the budget allocation every step, and its
orthogonality loss.

AdaLoRA (Zhang et al., ICLR 2023; ``peft.AdaLoraConfig``) prunes the singular values of ΔW = P·Λ·Q by an
importance score, which PEFT updates in ``update_and_allocate(step)``: it must be called after every
optimizer step while the gradients still exist (a frequent source of silently rank-8-forever runs). The
Trainer's ``on_optimizer_step`` event is exactly that point. PEFT adds AdaLoRA's orthogonal regulariser
to ``outputs.loss`` only when the model computes the loss itself; bayeslora computes the loss from class
scores, so the same term, ``orth_reg_weight · mean_P ‖P·Pᵀ − I‖_F`` over P and Q, is added here.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import TrainerCallback

from ..training.losses import LossTerms
from .base import Method, TrainingExtras, register_method


def adalora_tuner(model: nn.Module):
    """The ``AdaLoraModel`` inside a PEFT model, or None."""
    from peft.tuners.adalora import AdaLoraModel

    return next((m for m in model.modules() if isinstance(m, AdaLoraModel)), None)


class AdaLoraAllocation(TrainerCallback):
    """Calls ``update_and_allocate(global_step)`` after each optimizer step (gradients still present)."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        tuner = adalora_tuner(model)
        if tuner is not None:
            tuner.update_and_allocate(state.global_step)


class AdaLoraOrthogonality:
    """The extra loss ``orth_reg_weight · mean ‖P·Pᵀ − I‖_F`` over AdaLoRA's P (lora_A) and Q (lora_B)."""

    def __call__(self, model: nn.Module, trainer) -> LossTerms:
        tuner = adalora_tuner(model)
        adapter = tuner.trainable_adapter_name
        weight = tuner.peft_config[adapter].orth_reg_weight
        norms = []
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and adapter in name and ("lora_A" in name or "lora_B" in name):
                product = parameter @ parameter.T if "lora_A" in name else parameter.T @ parameter  # (r, r)
                eye = torch.eye(product.shape[0], device=product.device, dtype=product.dtype)
                norms.append(torch.linalg.matrix_norm(product - eye))
        term = weight * torch.stack(norms).mean() if norms else torch.zeros(())
        return LossTerms(terms={"orth_reg": term})


class AdaLora(Method):
    """SVD-form LoRA (P·Λ·Q) whose ranks start at 1.5x ``--rank`` and are pruned by importance to an average of
    ``--rank``, the budget of a LoRA of that rank."""

    peft_type = "ADALORA"
    name = "adalora"
    description = "AdaLoRA (PEFT's own): SVD-form LoRA whose ranks are pruned to a budget (average rank --rank)"
    learns_structure = True

    def peft_config(self, config, targets: list[str], task_type: str, total_steps: int):
        from peft import AdaLoraConfig

        # the AdaLoRA paper's schedule: rank 1.5x the target to start, budget pruned between 10% and 80% of the
        # steps; the final average rank equals --rank, the budget of a LoRA of that rank
        return AdaLoraConfig(
            init_r=math.ceil(1.5 * config.rank),
            target_r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout or 0.0,
            target_modules=targets,
            task_type=task_type,
            total_step=total_steps,
            tinit=int(0.1 * total_steps),
            tfinal=int(0.2 * total_steps),
            deltaT=max(1, total_steps // 100),
        )

    def training_extras(self, model: nn.Module, config, n_train: int) -> TrainingExtras:
        return TrainingExtras(losses=[AdaLoraOrthogonality()], callbacks=[AdaLoraAllocation()])


METHOD = register_method(AdaLora())
