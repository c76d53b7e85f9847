"""Facts about the environment: library versions, devices, peak memory."""

from __future__ import annotations

import platform
import resource
import sys
from importlib import metadata

import torch

#: Libraries whose versions every run records.
TRACKED_PACKAGES = (
    "bayeslora",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "torchmetrics",
    "safetensors",
)


def versions() -> dict[str, str | None]:
    """Installed version of each tracked package (None when missing), plus Python's."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in TRACKED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory of this process in MiB: CUDA's max allocated on a GPU, else the peak resident set size."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def device_summary() -> dict[str, object]:
    """Devices torch can use."""
    return {
        "cuda": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "mps": torch.backends.mps.is_available(),
        "cpu_threads": torch.get_num_threads(),
    }
