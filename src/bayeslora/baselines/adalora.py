"""PEFT's AdaLoRA in the Trainer: the budget allocation every step, and its orthogonality loss.

AdaLoRA (Zhang et al., ICLR 2023; ``peft.AdaLoraConfig``) prunes the singular values of ΔW = P·Λ·Q by an
importance score, which PEFT updates in ``update_and_allocate(step)``: it must be called after every
optimizer step while the gradients still exist (a frequent source of silently rank-8-forever runs). The
Trainer's ``on_optimizer_step`` event is exactly that point. PEFT adds AdaLoRA's orthogonal regulariser
to ``outputs.loss`` only when the model computes the loss itself; bayeslora computes the loss from class
scores, so the same term, ``orth_reg_weight · mean_P ‖P·Pᵀ − I‖_F`` over P and Q, is added here.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback

from ..training import LossTerms


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
