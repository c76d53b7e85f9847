"""``bayeslora export``: a run's adapter as a plain PEFT LoRA adapter, or packed at its learned bit-widths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import make_config
from ..runs import ADAPTER_DIR, RunExistsError, read_run_config
from ..runs.adapters import load_adapter
from ..tasks import load_task
from .common import load_base


def export(
    run: str | Path, to: str, out: str | Path, *, force_base: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Export the adapter of a run: ``to="lora"`` a plain PEFT LoRA adapter (B-LoRA truncated to its learned
        ranks and dequantized; the posterior mean of Me-LoRA and BLoB), ``to="packed"`` B-LoRA's integer codes at
        their learned bit-widths. Returns what was written and its size (every file decoding needs: tensors and their
    config) against the tensors of the 16-bit LoRA adapter of the same rank.
        ``force_base``: load the adapter even if its base model's fingerprint differs."""
    from ..runs.export import (
        EXPORT_FORMATS,
        PACKED_CONFIG,
        PACKED_WEIGHTS,
        export_lora,
        export_packed,
        reference_lora_bytes,
    )

    if to not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format '{to}': {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    if out.exists():
        raise RunExistsError(f"{out} already exists; choose another --out (exports never overwrite).")
    config = make_config(**read_run_config(run))
    task = load_task(config.task)
    network, _ = load_base(config, task, progress=progress)
    network = load_adapter(network, Path(run) / ADAPTER_DIR, force=force_base)
    if to == "lora":
        export_lora(network, out)
        needed = ["adapter_model.safetensors", "adapter_config.json"]
    else:
        export_packed(network, out)
        needed = [PACKED_WEIGHTS, PACKED_CONFIG]  # the codes and what decodes them; a classifier head is stored apart
    files = {name: (out / name).stat().st_size for name in needed}
    size = sum(files.values())
    reference = reference_lora_bytes(network)
    return {
        "format": to,
        "out": str(out),
        "bytes": size,
        "files": files,
        "reference_16bit_lora_bytes": reference,
        "ratio": size / reference,
    }
