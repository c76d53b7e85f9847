"""Me-LoRA: memory-efficient Bayesian LoRA (ΔW = s·B·S·A with a Gaussian r×r core S)."""

from .config import MeLoraConfig
from .layer import MeLoraLayer
from .model import MeLoraModel

__all__ = ["MeLoraConfig", "MeLoraLayer", "MeLoraModel"]
