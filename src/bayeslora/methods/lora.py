"""``lora``: PEFT's own LoRA, unchanged (the MLE baseline), so that comparisons with it are fair."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Method, register_method, shared_options

if TYPE_CHECKING:
    from peft import PeftConfig

    from ..config import RunConfig


class Lora(Method):
    """ΔW = s·B·A with PEFT's ``LoraConfig``."""

    name = "lora"
    description = "plain LoRA, PEFT's own implementation (the MLE baseline)"

    def peft_config(self, config: RunConfig, targets: list[str], task_type: str, total_steps: int) -> PeftConfig:
        from peft import LoraConfig

        return LoraConfig(**shared_options(config, targets, task_type))


METHOD = register_method(Lora())
