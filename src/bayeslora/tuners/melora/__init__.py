"""Me-LoRA: memory-efficient Bayesian LoRA (ΔW = s·B·S·A with a Gaussian r×r core S)."""

from .config import MeLoraConfig, MeLoraCoreOptions
from .layer import MeLoraLayer, SampledCoreMixin
from .model import MeLoraModel

__all__ = ["MeLoraConfig", "MeLoraCoreOptions", "MeLoraLayer", "MeLoraModel", "SampledCoreMixin"]
