"""Export a trained adapter in formats that need no bayeslora to use.

* ``lora``: a plain PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) that
  ``PeftModel.from_pretrained`` loads in a process that never imported bayeslora. Every layer's deterministic
  update ``ΔW = B'·A'`` is written as LoRA factors: B-LoRA truncated to its learned rank (``rank_pattern``)
  and dequantized, the posterior mean for Me-LoRA and BLoB. The scaling is folded into B' and every
  module's ``lora_alpha`` equals its rank (PEFT's scaling α/r = 1).
* ``packed``: B-LoRA's factors as integer codes at their learned bit-widths, bit-packed, plus each
  tensor's range (``lo``, step) in safetensors, with a JSON description (and extra trained modules such
  as a classifier head in float32, in a file of their own); :func:`load_packed` turns it back into the
  LoRA factors (equal to the ``lora`` export up to float rounding of ``lo + step·code``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..io import write_dir_atomic
from ..tuners.base import BayesianLowRankLayer
from ..tuners.blora import BLoraLayer
from ..tuners.blora.layer import evaluation_gates
from ..tuners.blora.quantizer import integer_codes, quantize_fixed

EXPORT_FORMATS = ("lora", "packed")
PACKED_WEIGHTS = "packed_adapter.safetensors"
PACKED_CONFIG = "packed_adapter.json"
PACKED_MODULES = "modules_to_save.safetensors"  # trained extra modules (a classifier head), float32
PACKED_FORMAT = "bayeslora-packed-lora/1"
_PREFIX = "base_model.model."


@dataclass
class ExportedLayer:
    """The LoRA factors of one layer: ``ΔW = B @ A``, A (r', n), B (m, r') with the scaling folded in."""

    name: str  # module name inside the base model (``model.layers.0.self_attn.q_proj``)
    A: Tensor
    B: Tensor


def lora_factors(model: nn.Module, adapter: str = "default") -> list[ExportedLayer]:
    """The deterministic LoRA factors of every bayeslora adapter layer of a PEFT model."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, BayesianLowRankLayer) or not module._has(adapter):
            continue
        if isinstance(module, BLoraLayer) and module.quantize_base[adapter]:
            raise ValueError(
                f"{name} quantizes its frozen weight and input (--quantize-base): a plain LoRA adapter on an "
                f"unquantized base would not behave like the trained model. Load the run's adapter with bayeslora."
            )
        A, B = module.effective_factors(adapter)
        found.append(ExportedLayer(name.removeprefix(_PREFIX), A.detach().float(), B.detach().float()))
    if not found:
        raise ValueError("the model has no bayeslora adapter layers to export (a plain LoRA run is already a LoRA)")
    return found


def _lora_config(
    layers: list[ExportedLayer], base_model: str | None, task_type: str | None, modules_to_save: list[str] | None
):
    from peft import LoraConfig

    ranks = {layer.name: int(layer.A.shape[0]) for layer in layers}
    top = max(ranks.values())
    return LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=sorted(ranks),  # full module names: PEFT adapts exactly these layers
        rank_pattern={name: rank for name, rank in ranks.items() if rank != top},
        alpha_pattern={name: rank for name, rank in ranks.items() if rank != top},
        base_model_name_or_path=base_model,
        task_type=task_type,
        modules_to_save=sorted(modules_to_save) if modules_to_save else None,
    )


def export_lora(
    model: nn.Module, out: str | Path, adapter: str = "default", dtype: torch.dtype = torch.float32
) -> Path:
    """Write the model's adapter as a plain PEFT LoRA adapter in ``out`` (atomically; refused if it exists).
    A PEFT LoRA (or AdaLoRA) adapter is already one, and is written as it is."""
    peft_config = model.peft_config[adapter]
    if str(peft_config.peft_type.value) in ("LORA", "ADALORA"):
        if len(model.peft_config) > 1:
            raise ValueError(
                f"the model holds {len(model.peft_config)} adapters (an ensemble): each of adapter/<member>/ is "
                f"already a plain PEFT LoRA adapter; there is no single LoRA to export"
            )
        _refuse_existing(Path(out))
        write_dir_atomic(Path(out), lambda tmp: model.save_pretrained(str(tmp), save_embedding_layers=False))
        return Path(out)
    return _write_lora(
        lora_factors(model, adapter),
        _saved_modules(model, adapter),
        Path(out),
        base_model=peft_config.base_model_name_or_path,
        task_type=peft_config.task_type,
        modules_to_save=peft_config.modules_to_save,
        dtype=dtype,
    )


def _write_lora(
    layers: list[ExportedLayer],
    extra: dict[str, Tensor],
    out: Path,
    *,
    base_model: str | None,
    task_type: str | None,
    modules_to_save: list[str] | None,
    dtype: torch.dtype,
) -> Path:
    """A PEFT LoRA adapter directory holding ``layers`` (and ``extra`` saved modules such as a head)."""
    config = _lora_config(layers, base_model, task_type, modules_to_save)
    tensors = {}
    for layer in layers:
        tensors[f"{_PREFIX}{layer.name}.lora_A.weight"] = layer.A.to(dtype).contiguous()
        tensors[f"{_PREFIX}{layer.name}.lora_B.weight"] = layer.B.to(dtype).contiguous()
    tensors.update(extra)

    def write(tmp: Path) -> None:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})

    _refuse_existing(out)
    write_dir_atomic(out, write)
    return out


def _saved_modules(model: nn.Module, adapter: str) -> dict[str, Tensor]:
    """The extra trained modules (``modules_to_save``, e.g. a classifier head) in PEFT's saved layout: the
    adapter's saved state without the tuner's own parameters."""
    from peft.utils import get_peft_model_state_dict

    prefix = model.base_model.prefix
    state = get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=False)
    return {key: value.detach().float().contiguous() for key, value in state.items() if prefix not in key}


def _refuse_existing(out: Path) -> None:
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another --out (exports never overwrite).")


# --- packed ---


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Integer codes in [0, 2^b) as a flat byte tensor: 8/b codes per byte for b ≤ 8 (first code in the low
    bits), little-endian int16 for b = 16 (offset by −2^15)."""
    flat = codes.flatten().to(torch.int64)
    if bits == 16:
        return (flat - 2**15).to(torch.int16)
    if bits > 8:
        raise ValueError(f"packing supports 2, 4, 8 or 16 bits, got {bits}")
    per_byte = 8 // bits
    pad = (-flat.numel()) % per_byte
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, per_byte)  # (bytes, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int64) * bits
    return (flat << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, count: int) -> Tensor:
    """The inverse of :func:`pack_codes`: ``count`` int64 codes."""
    if bits == 16:
        return packed.to(torch.int64)[:count] + 2**15
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int64) * bits
    codes = (packed.to(torch.int64)[:, None] >> shifts) & (2**bits - 1)
    return codes.flatten()[:count]


def _packed_tensor(prefix: str, value: Tensor, bounds: Tensor, bits: int, tensors: dict) -> dict[str, Any]:
    """Store one quantized tensor (codes, or raw float32 at 32 bits); return its description."""
    shape = list(value.shape)
    if bits == 32:  # stored as float32, clipped to the learned range as the model uses it
        tensors[prefix] = quantize_fixed(value.detach().float().cpu(), bounds.detach().float().cpu(), 32).contiguous()
        return {"bits": 32, "shape": shape}
    codes, lo, step = integer_codes(value, bounds, bits)
    tensors[prefix] = pack_codes(codes, bits).contiguous()
    return {"bits": bits, "shape": shape, "lo": lo, "step": step}


def export_packed(model: nn.Module, out: str | Path, adapter: str = "default") -> Path:
    """Write a B-LoRA adapter's factors at their learned bit-widths (truncated to the learned ranks) to ``out``:
    ``packed_adapter.safetensors`` + ``packed_adapter.json`` (atomically; refused if ``out`` exists)."""
    out = Path(out)
    tensors: dict[str, Tensor] = {}
    layers: dict[str, Any] = {}
    for name, module in model.named_modules():
        if not isinstance(module, BLoraLayer) or not module._has(adapter):
            continue
        if module.quantize_base[adapter]:
            raise ValueError("packed export covers the adapter only; a base-quantized B-LoRA run has no plain base")
        key = name.removeprefix(_PREFIX)
        rank, bits = module.learned_rank(adapter), module.learned_bits(adapter)
        entry: dict[str, Any] = {"rank": rank, "scaling": module.scaling[adapter], "tensors": {}}
        sources = {"A": module.blora_A[adapter][:rank], "B": module.blora_B[adapter][:, :rank]}
        if not module.bayesian_core[adapter]:
            sources["e"] = module.blora_e[adapter][:rank]
        for tensor, value in sources.items():
            bounds = getattr(module, f"blora_{tensor}_range")[adapter]
            entry["tensors"][tensor] = _packed_tensor(f"{key}.{tensor}", value, bounds, bits[tensor], tensors)
        if module.bayesian_core[adapter]:
            tensors[f"{key}.core"] = _stored_core(module, adapter, rank)
            entry["tensors"]["core"] = {"bits": 32, "shape": [rank, rank]}
        layers[key] = entry
    if not layers:
        raise ValueError("packed export needs a B-LoRA adapter (--method blora)")
    peft_config = model.peft_config[adapter]
    description = {
        "format": PACKED_FORMAT,
        "base_model_name_or_path": peft_config.base_model_name_or_path,
        "task_type": peft_config.task_type,
        "modules_to_save": sorted(peft_config.modules_to_save) if peft_config.modules_to_save else None,
        "layers": layers,
    }
    extra = _saved_modules(model, adapter)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / PACKED_WEIGHTS), metadata={"format": PACKED_FORMAT})
        (tmp / PACKED_CONFIG).write_text(json.dumps(description, indent=2) + "\n")
        if extra:
            save_file(extra, str(tmp / PACKED_MODULES), metadata={"format": "pt"})

    _refuse_existing(out)
    write_dir_atomic(out, write)
    return out


def _stored_core(module: BLoraLayer, adapter: str, rank: int) -> Tensor:
    """A Bayesian core's mean, (r', r'), as it multiplies the stored factors: with unit factors the forward pass
    divides Q(A)'s rows and Q(B)'s columns by their lengths, which is folded into the core here."""
    core = module.mean_core_matrix(adapter).detach().float()
    if module.factor_norm.get(adapter) == "unit":
        with torch.no_grad(), evaluation_gates(module):
            a_norms = module.quantize("A", module.blora_A[adapter], adapter).float().norm(dim=1)  # (r,)
            b_norms = module.quantize("B", module.blora_B[adapter], adapter).float().norm(dim=0)  # (r,)
        core = core / b_norms.clamp_min(1e-12)[:, None] / a_norms.clamp_min(1e-12)[None, :]
    return core[:rank, :rank].contiguous()


def _unpacked(tensors: dict[str, Tensor], key: str, info: dict[str, Any]) -> Tensor:
    shape = info["shape"]
    if info["bits"] == 32:
        return tensors[key].float().reshape(shape)
    codes = unpack_codes(tensors[key], info["bits"], math.prod(shape))
    return (info["lo"] + info["step"] * codes.double()).float().reshape(shape)


def load_packed(path: str | Path) -> tuple[list[ExportedLayer], dict[str, Any], dict[str, Tensor]]:
    """Read a packed export: ``(LoRA factors per layer, its JSON description, extra saved modules)``."""
    path = Path(path)
    try:
        description = json.loads((path / PACKED_CONFIG).read_text())
        tensors = load_file(str(path / PACKED_WEIGHTS))
    except (OSError, json.JSONDecodeError, Exception) as error:
        raise ValueError(f"{path} is not a readable packed bayeslora adapter: {error}") from error
    if description.get("format") != PACKED_FORMAT:
        raise ValueError(f"{path / PACKED_CONFIG} is not a {PACKED_FORMAT} description")
    layers = []
    for name, entry in description["layers"].items():
        parts = {t: _unpacked(tensors, f"{name}.{t}", info) for t, info in entry["tensors"].items()}
        middle = torch.diag(parts["e"]) if "e" in parts else parts["core"]
        layers.append(ExportedLayer(name, parts["A"], entry["scaling"] * (parts["B"] @ middle)))
    extra = load_file(str(path / PACKED_MODULES)) if (path / PACKED_MODULES).is_file() else {}
    return layers, description, extra


def packed_to_lora(path: str | Path, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Turn a packed export into a plain PEFT LoRA adapter directory (for ``PeftModel.from_pretrained``)."""
    layers, description, extra = load_packed(path)
    return _write_lora(
        layers,
        extra,
        Path(out),
        base_model=description.get("base_model_name_or_path"),
        task_type=description.get("task_type"),
        modules_to_save=description.get("modules_to_save"),
        dtype=dtype,
    )


def reference_lora_bytes(model: nn.Module, adapter: str = "default") -> int:
    """Size in bytes of the safetensors file of the 16-bit LoRA adapter of the same maximal rank (A and B of
    every adapted layer in float16, PEFT's key names; extra modules such as a classifier head not
    included), measured by writing it."""
    import tempfile

    from peft.tuners.lora import LoraLayer

    tensors = {}
    for name, module in model.named_modules():
        adapted = module._has(adapter) if isinstance(module, BayesianLowRankLayer) else False
        adapted = adapted or (isinstance(module, LoraLayer) and adapter in module.lora_A)
        if adapted:
            r, key = module.r[adapter], name.removeprefix(_PREFIX)
            tensors[f"{_PREFIX}{key}.lora_A.weight"] = torch.zeros(r, module.in_features, dtype=torch.float16)
            tensors[f"{_PREFIX}{key}.lora_B.weight"] = torch.zeros(module.out_features, r, dtype=torch.float16)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter_model.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        return path.stat().st_size
