"""Facts about the environment: library versions, devices, peak memory."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import ClassVar

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
    peak_mib = peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
    # a ResidentPeak's reset lowers ru_maxrss too, and ru_maxrss can lag the kernel's high-water mark a little
    return max(peak_mib, max(_erased_peak_kib, _resident_high_water_kib() or 0) / 2**10)


#: The highest resident set that ResidentPeak's resets of the kernel's high-water mark erased (KiB).
_erased_peak_kib = 0


def _resident_high_water_kib() -> int | None:
    """The process's peak resident set since its last reset (``VmHWM`` of /proc/self/status, KiB; Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_resident_high_water() -> bool:
    """Reset ``VmHWM`` to the current resident set (``echo 5 > /proc/self/clear_refs``, Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class ResidentPeak:
    """The peak resident set (MiB) of this process while the block runs: what one phase (a training run, an
    evaluation) needed, not the lifetime peak of ``ru_maxrss``, which every later phase in the same process
    inherits. On Linux the kernel's high-water mark is reset on entry (probes may nest: an outer probe keeps the
    peak its inner probes' resets erased); elsewhere :attr:`lifetime` is True and the value is the process's
    lifetime peak (on CUDA the allocator's, which :class:`AllocationPeak` resets inside training steps). Used as::

        with ResidentPeak(device) as probe:
            evaluate()
        probe.peak_mib
    """

    _open: ClassVar[list[ResidentPeak]] = []  # the probes whose blocks are running, outermost first

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_mib = 0.0
        self.lifetime = False
        self._peak_kib = 0

    def __enter__(self) -> ResidentPeak:
        if self.device.type == "cuda":  # not reset: AllocationPeak's resets inside the block would erase it
            self.lifetime = True
            return self
        global _erased_peak_kib
        now = _resident_high_water_kib()
        _erased_peak_kib = max(_erased_peak_kib, now or 0)
        for outer in ResidentPeak._open:  # what the reset below erases from their view
            outer._peak_kib = max(outer._peak_kib, now or 0)
        self.lifetime = now is None or not _reset_resident_high_water()
        ResidentPeak._open.append(self)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.device.type != "cuda":
            ResidentPeak._open.remove(self)
        if self.lifetime:
            self.peak_mib = peak_memory_mb(self.device)
            return
        self._peak_kib = max(self._peak_kib, _resident_high_water_kib() or 0)
        self.peak_mib = self._peak_kib / 2**10


class AllocationPeak:
    """Measures the largest number of bytes held at once by the allocator while the block runs, above what
    was held when it started: the memory cost of a training step on top of the model, its inputs and the
    optimizer state.

    On CUDA this is ``max_memory_allocated`` after a reset. On the CPU there is no such counter, and the
    resident set size depends on the C allocator's page reuse; so the block runs under the PyTorch
    profiler with ``profile_memory=True``, whose ``[memory]`` events carry the CPU allocator's exact live
    byte count ("Total Allocated", counting allocations made after the profiler started). Used as::

        with AllocationPeak(device) as probe:
            step()
        probe.peak_mib
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self._profiler = None
        self._base = 0

    def __enter__(self) -> AllocationPeak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            # Kineto prints "profiler_start" lines at any log level, and the CPU allocator warns (once per
            # process) when a block from before the profiler is freed under it, which every training step
            # does: both are consumed here, silently.
            earlier = torch.empty(1)
            with _native_stderr_silenced():
                self._profiler.__enter__()
                del earlier
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
            return
        with _native_stderr_silenced():
            self._profiler.__exit__(kind, error, trace)
        if kind is None:
            self.peak_bytes = _profiled_peak_bytes(self._profiler)

    @property
    def peak_mib(self) -> float:
        """:attr:`peak_bytes` in MiB."""
        return self.peak_bytes / 2**20


@contextlib.contextmanager
def _native_stderr_silenced():
    """Send what native code writes to file descriptor 2 to /dev/null within the block (Python-level
    exceptions still propagate). Used only around the profiler's start and stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _profiled_peak_bytes(profiler) -> int:
    """The largest number of bytes live at once among the blocks allocated while the profile ran.

    Replays the ``[memory]`` events (``Addr``, ``Bytes``: positive for an allocation, negative for a free)
    in time order. The allocator's own running total ("Total Allocated") is not used: it is a process-wide
    counter that keeps the bytes of every block allocated under an earlier profile and freed outside one,
    so it drifts upwards across probes in one process. Frees of blocks allocated before the profile started
    are ignored (the allocator reports none, or one with a stale size)."""
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        profiler.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted(
        (e for e in events if e.get("name") == "[memory]"), key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0))
    )
    live: dict[int, int] = {}  # address -> bytes of a block allocated inside the profile
    total = peak = 0
    for event in memory:
        address, size = event["args"]["Addr"], event["args"]["Bytes"]
        if size > 0:
            total += size - live.get(address, 0)
            live[address] = size
            peak = max(peak, total)
        elif address in live:
            total -= live.pop(address)
    return peak


def device_summary() -> dict[str, object]:
    """Devices torch can use."""
    return {
        "cuda": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "mps": torch.backends.mps.is_available(),
        "cpu_threads": torch.get_num_threads(),
    }
