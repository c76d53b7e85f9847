"""The frozen base's fast arithmetic: its dtype chosen by measurement, and contiguous inputs to its linear layers.

* **dtype.** On a GPU the base runs in bf16 (fp16 where bf16 is not supported). On a CPU the faster of fp32
  and bf16 depends on the CPU: with bf16 matrix units (AMX, ``amx_bf16``) a bf16 matmul runs ~4x faster than
  fp32, without them it can be ~10x slower. So ``dtype="auto"`` on a CPU times the same linear layer in both on
  first use (:func:`probe_cpu_matmul`, ~0.2 s) and keeps the verdict in the user cache, one entry per CPU model,
  feature flags, thread count and torch version. bf16 is chosen only when it is clearly faster
  (:data:`BF16_MARGIN`). Adapters, posterior parameters, losses and metrics stay in fp32 whatever the base's
  dtype (PEFT keeps adapter weights in fp32; scorers compute in fp32).
* **layout.** A linear layer on a strided input (a slice of hidden states, such as BERT's pooler takes) is far
  off the fast path: measured on an AMX CPU, SmolLM2's LM head on 16 x 8 positions sliced from (16, 64, 576)
  took 201 ms in fp32 and 1,107 ms in bf16 against 29.5 ms and 8.9 ms on a contiguous copy.
  :func:`contiguous_linear_inputs` makes every linear layer of a model copy such an input first.

``BAYESLORA_CPU_DTYPE`` (``float32`` or ``bfloat16``) replaces the measurement, e.g. to compare machines in one
precision.
"""

from __future__ import annotations

import hashlib
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from filelock import FileLock
from torch import nn

from .io import read_json, write_json_atomic

#: bf16 is chosen on a CPU when its matmul takes at most this fraction of fp32's time (the rest of a step, norms
#: and element-wise work, gains less than the matmuls do).
BF16_MARGIN = 0.8
#: The probe's linear layer: (tokens, in features, out features), a transformer projection of modest size.
PROBE_SHAPE = (512, 1024, 1024)
#: Environment variable that replaces the measurement on a CPU.
CPU_DTYPE_ENV = "BAYESLORA_CPU_DTYPE"
_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def probe_cpu_matmul(shape: tuple[int, int, int] = PROBE_SHAPE, repeats: int = 7) -> dict[str, float]:
    """Milliseconds of ``F.linear`` on contiguous ``(tokens, in) x (out, in)ᵀ`` inputs in fp32 and bf16 on this
    CPU: the median of ``repeats`` timings each, interleaved after two warm-up calls."""
    tokens, fan_in, fan_out = shape
    generator = torch.Generator().manual_seed(0)
    inputs = {
        name: (
            torch.randn(tokens, fan_in, generator=generator).to(dtype),
            torch.randn(fan_out, fan_in, generator=generator).to(dtype),
        )
        for name, dtype in _NAMES.items()
    }
    timings: dict[str, list[float]] = {name: [] for name in _NAMES}
    with torch.no_grad():
        for round_ in range(repeats + 2):
            for name, (x, weight) in inputs.items():
                started = time.perf_counter()
                F.linear(x, weight)
                if round_ >= 2:
                    timings[name].append(1000 * (time.perf_counter() - started))
    return {f"{name}_ms": statistics.median(values) for name, values in timings.items()}


def _cpu_identity() -> str:
    """What the verdict depends on: the CPU model and feature flags, the thread count and torch's version."""
    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = hashlib.sha256((fields.get("flags") or fields.get("Features") or "").encode()).hexdigest()[:12]
    return f"{model} | flags {flags} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def _probe_file() -> Path:
    from .assets import cache_dir

    return cache_dir() / "probes" / "cpu_dtype.json"


def cpu_base_dtype() -> torch.dtype:
    """The dtype of a frozen base on this CPU: ``BAYESLORA_CPU_DTYPE`` if set, else bf16 when the probe measured
    its matmul at most :data:`BF16_MARGIN` of fp32's time, else fp32 (measured once per CPU, then cached)."""
    forced = os.environ.get(CPU_DTYPE_ENV)
    if forced:
        if forced not in _NAMES:
            raise ValueError(f"{CPU_DTYPE_ENV}={forced!r}: choose one of {', '.join(_NAMES)}, or unset it")
        return _NAMES[forced]
    return _NAMES[cpu_probe_verdict()["dtype"]]


def cpu_probe_verdict() -> dict[str, object]:
    """This CPU's probe record ``{"dtype", "float32_ms", "bfloat16_ms", "cpu", "measured"}``, measured now if the
    cache has none for it."""
    path = _probe_file()
    identity = _cpu_identity()
    cached = _read_cache(path)
    if identity in cached:
        return cached[identity]
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        cached = _read_cache(path)
        if identity not in cached:
            timings = probe_cpu_matmul()
            faster = timings["bfloat16_ms"] <= BF16_MARGIN * timings["float32_ms"]
            cached[identity] = {
                "dtype": "bfloat16" if faster else "float32",
                **{key: round(value, 3) for key, value in timings.items()},
                "cpu": identity,
                "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            write_json_atomic(path, cached)
    return cached[identity]


def _read_cache(path: Path) -> dict[str, dict]:
    """The cached verdicts; a damaged cache file counts as empty (it is measured again and rewritten)."""
    if not path.is_file():
        return {}
    try:
        data = read_json(path)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _contiguous_input(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: the input as a contiguous copy when it is strided (nothing is done otherwise)."""
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def contiguous_linear_inputs(model: nn.Module) -> int:
    """Make every ``nn.Linear`` of ``model`` copy a strided input before multiplying (a forward pre-hook; the
    layers PEFT wraps keep it, as their base layer). Returns how many layers were hooked."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and not getattr(module, "_bayeslora_contiguous", False):
            module.register_forward_pre_hook(_contiguous_input)
            module._bayeslora_contiguous = True
            count += 1
    return count
