"""bayeslora's PEFT tuners, registered with PEFT on import."""

from ._peft_compat import register
from .base import BayesianLowRankLayer, BayesianLowRankModel
from .blob import BlobConfig, BlobLayer, BlobModel
from .blora import BLoraConfig, BLoraLayer, BLoraModel
from .melora import MeLoraConfig, MeLoraLayer, MeLoraModel

register("melora", MeLoraConfig, MeLoraModel, prefix="melora_")
register("blob", BlobConfig, BlobModel, prefix="blob_")
register("blora", BLoraConfig, BLoraModel, prefix="blora_")

__all__ = [
    "BLoraConfig",
    "BLoraLayer",
    "BLoraModel",
    "BayesianLowRankLayer",
    "BayesianLowRankModel",
    "BlobConfig",
    "BlobLayer",
    "BlobModel",
    "MeLoraConfig",
    "MeLoraLayer",
    "MeLoraModel",
]
