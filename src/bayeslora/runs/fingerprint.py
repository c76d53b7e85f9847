"""The fingerprint of a base model, saved beside an adapter so that loading it onto another base fails clearly.

An adapter's weights have the shapes of its base, but shapes alone do not tell SmolLM2-135M from another
135M Llama, nor a model from one cut to fewer layers (``--num-layers``). The fingerprint records the
architecture, the configuration values that fix every shape, and a hash of a fixed sample of the input
embedding rows (the one weight matrix that adapters never wrap and that every pretrained model has in its
own way; a 4-bit or 8-bit base keeps it in full precision).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..io import read_json, write_json_atomic

#: Written into the adapter directory.
FINGERPRINT_FILE = "base_fingerprint.json"

#: Configuration values that fix the shapes of a transformer (those a model's config has).
_SHAPE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_labels",
)

#: Embedding rows hashed (spread evenly over the vocabulary).
_ROWS = 64


class AdapterMismatchError(ValueError):
    """An adapter is being loaded onto a base model other than the one it was trained on."""


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _embedding_sample(model: nn.Module) -> Tensor:
    """``_ROWS`` rows of the base's input embedding at indices ⌊k·V/_ROWS⌋, in the model's dtype, on the CPU."""
    embedding = base_model_of(model).get_input_embeddings().weight  # (V, d)
    rows = torch.linspace(0, embedding.shape[0] - 1, steps=min(_ROWS, embedding.shape[0])).long()
    return embedding.detach()[rows].to("cpu")  # (_ROWS, d)


def _sha256(sample: Tensor, dtype: torch.dtype | None = None) -> str:
    """SHA-256 of ``sample`` (rounded to ``dtype`` first, if given) as contiguous float32 bytes."""
    rounded = sample if dtype is None else sample.to(dtype)
    return hashlib.sha256(rounded.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """``{"name", "architecture", "config": {shape values}, "embedding_sha256", "embedding_sha256_bf16"}`` of a
    (possibly PEFT-wrapped) transformers model. The hashes cover ``_ROWS`` embedding rows at indices ⌊k·V/_ROWS⌋ as
    float32: as loaded, and rounded to bfloat16, which the same weights loaded in float32 or bfloat16 share (a run
    trained on a bf16 base evaluates on the fp32 one, and back)."""
    base = base_model_of(model)
    config = base.config
    sample = _embedding_sample(model)
    return {
        "name": getattr(config, "_name_or_path", "") or type(base).__name__,
        "architecture": type(base).__name__,
        "config": {key: getattr(config, key) for key in _SHAPE_KEYS if getattr(config, key, None) is not None},
        "embedding_sha256": _sha256(sample),
        "embedding_sha256_bf16": _sha256(sample, torch.bfloat16),
    }


def same_weights(stored: dict[str, Any], model: nn.Module) -> bool:
    """Whether the fingerprint ``stored`` and ``model`` hold the same embedding weights, whatever the precision either
    was loaded in: equal hashes as loaded, or as rounded to bfloat16. (Fingerprints of earlier versions have only
    the first; the current weights rounded to bfloat16 or float16 then match one taken of a half-precision load.)"""
    sample = _embedding_sample(model)
    if stored.get("embedding_sha256") == _sha256(sample):
        return True
    if "embedding_sha256_bf16" in stored:
        return stored["embedding_sha256_bf16"] == _sha256(sample, torch.bfloat16)
    return stored.get("embedding_sha256") in {_sha256(sample, torch.bfloat16), _sha256(sample, torch.float16)}


def write_fingerprint(model: nn.Module, adapter_dir: str | Path) -> None:
    """Save the fingerprint of ``model``'s base into ``adapter_dir`` (atomically); a base that is not a
    transformers model (no ``config``, no input embeddings) has none."""
    base = base_model_of(model)
    if not hasattr(base, "config") or not callable(getattr(base, "get_input_embeddings", None)):
        return
    write_json_atomic(Path(adapter_dir) / FINGERPRINT_FILE, base_fingerprint(model))


def check_fingerprint(model: nn.Module, adapter_dir: str | Path, *, force: bool = False) -> None:
    """Raise :class:`AdapterMismatchError` naming both models and what differs, if ``adapter_dir`` records a
    base other than ``model``'s. Adapters without a fingerprint (written by PEFT itself) are not checked;
    ``force`` skips the check."""
    path = Path(adapter_dir) / FINGERPRINT_FILE
    if force or not path.is_file():
        return
    stored, current = read_json(path), base_fingerprint(model)
    differences = [
        f"{key}: {stored['config'].get(key)!r} (adapter's base) vs {current['config'].get(key)!r} (this base)"
        for key in sorted(set(stored.get("config", {})) | set(current["config"]))
        if stored.get("config", {}).get(key) != current["config"].get(key)
    ]
    if stored.get("architecture") != current["architecture"]:
        differences.insert(0, f"architecture: {stored.get('architecture')} vs {current['architecture']}")
    if not differences and not same_weights(stored, model):
        differences.append("same shapes, different weights (embedding hash)")
    if differences:
        raise AdapterMismatchError(
            f"The adapter in {adapter_dir} was trained on '{stored.get('name')}', not on this base "
            f"'{current['name']}':\n  - " + "\n  - ".join(differences) + "\nLoad it onto the model it was "
            "trained on (and the same --num-layers), or pass force=True (--force-base) to load it anyway."
        )
