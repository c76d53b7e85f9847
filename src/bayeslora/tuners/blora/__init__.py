"""B-LoRA: LoRA whose rank and bit-width per matrix are learned by Bayesian gates (Meo et al., 2024)."""

from .config import BLoraConfig
from .layer import BLoraLayer
from .model import BLoraModel

__all__ = ["BLoraConfig", "BLoraLayer", "BLoraModel"]
