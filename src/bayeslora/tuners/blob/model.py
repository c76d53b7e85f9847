"""The BLoB PEFT model: wraps each target linear layer in a :class:`BlobLayer`."""

from __future__ import annotations

from ..base import BayesianLowRankModel
from .layer import BlobLayer


class BlobModel(BayesianLowRankModel):
    """Creates a BLoB model from a transformers model (use ``peft.get_peft_model`` with a
    :class:`~bayeslora.BlobConfig`)."""

    prefix: str = "blob_"
    layer_cls = BlobLayer
    tuner_layer_cls = BlobLayer
