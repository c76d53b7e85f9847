"""BLoB: Bayesian LoRA by backpropagation, a Gaussian on every entry of A (Wang et al., NeurIPS 2024)."""

from .config import BlobConfig
from .layer import BlobLayer
from .model import BlobModel

__all__ = ["BlobConfig", "BlobLayer", "BlobModel"]
