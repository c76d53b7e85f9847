"""Loading base models: built-in aliases, Hugging Face ids and local folders; device, dtype, targets.

A model is loaded with one of two heads: ``causal-lm`` (multiple-choice tasks, scored by the language
model) or ``classification`` (sequence-classification tasks, a new linear head on top).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from . import assets
from .precision import contiguous_linear_inputs

Head = Literal["causal-lm", "classification"]


@dataclass(frozen=True)
class ModelAlias:
    """A built-in model name that resolves to a local folder without the network."""

    name: str
    description: str
    resolve: Callable[[], Path]
    hub_id: str | None = None  # the Hugging Face model it is (a conversion of): what saved adapters name as their base


MODEL_ALIASES: dict[str, ModelAlias] = {
    alias.name: alias
    for alias in (
        ModelAlias(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama, 30 layers, 135M; from the packaged 4-bit GGUF, converted once)",
            assets.converted_smollm2_dir,
            "HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        ModelAlias(
            "minilm-l6",
            "all-MiniLM-L6-v2 (BERT encoder, 6 layers, 22.7M)",
            assets.minilm_dir,
            "sentence-transformers/all-MiniLM-L6-v2",
        ),
    )
}


class ModelLoadError(ValueError):
    """The model name is neither an alias, a local folder, nor a reachable Hugging Face id."""


def resolve_model(name: str) -> str:
    """The path or Hub id to hand to ``from_pretrained`` for ``name`` (an alias, a folder or a Hub id)."""
    if name in MODEL_ALIASES:
        return str(MODEL_ALIASES[name].resolve())
    return name


def hub_name(name: str) -> str:
    """The name a saved adapter records as its base model: an alias's Hugging Face id, else ``name`` itself."""
    alias = MODEL_ALIASES.get(name)
    return alias.hub_id if alias is not None and alias.hub_id else name


def default_device() -> torch.device:
    """CUDA when present, else Apple MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """The frozen base's dtype for ``dtype="auto"``: bf16 on GPUs that support it (else fp16); on a CPU, whichever
    of fp32 and bf16 a short measurement finds faster on this CPU (see :mod:`bayeslora.precision`); fp32 on
    other devices."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        from .precision import cpu_base_dtype

        return cpu_base_dtype()
    return torch.float32


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` picks :func:`default_dtype`; otherwise one of float32, bfloat16, float16."""
    if name == "auto":
        return default_dtype(device)
    if name not in _DTYPES:
        raise ValueError(f"Unknown dtype '{name}': choose one of auto, {', '.join(_DTYPES)}.")
    return _DTYPES[name]


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    """Tokenizer of ``name`` with a pad token (the EOS token when the model defines none)."""
    from transformers import AutoTokenizer

    source = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise _load_error(name, error) from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"The tokenizer of '{name}' has neither a pad nor an EOS token to pad with.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str,
    *,
    head: Head = "causal-lm",
    num_labels: int | None = None,
    num_layers: int | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    quantization: str | None = None,
):
    """Load a base model and its tokenizer.

    Args:
        name: a built-in alias (see :data:`MODEL_ALIASES`), a local folder, or a Hugging Face model id.
        head: ``causal-lm`` for multiple-choice scoring, ``classification`` for a new classifier head.
        num_labels: number of classes of the classification head.
        num_layers: keep only the first ``num_layers`` transformer blocks (quick experiments, tests).
        dtype: ``auto`` (bf16 on GPU; on CPU the faster of fp32 and bf16, measured, see :func:`default_dtype`)
            or a dtype.
        device: where to put the model; default :func:`default_device`.
        progress: show transformers' weight-loading progress bar.
        quantization: ``4bit`` (NF4) or ``8bit`` (LLM.int8()) through bitsandbytes, computing in ``dtype``;
            the quantized model stays where bitsandbytes puts it (``device``).

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    device = torch.device(device) if device is not None else default_device()
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype, device)
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    source = resolve_model(name)
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if quantization is not None:
        kwargs.update(quantization_config=bitsandbytes_config(quantization, torch_dtype), device_map=str(device))
    try:
        with _progress_bars(progress):
            if head == "causal-lm":
                model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            elif head == "classification":
                if not num_labels or num_labels < 2:
                    raise ValueError(f"A classification head needs num_labels >= 2, got {num_labels}.")
                with warnings.catch_warnings():  # the new head is meant to be untrained
                    warnings.simplefilter("ignore")
                    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, **kwargs)
            else:
                raise ValueError(f"Unknown head '{head}': choose causal-lm or classification.")
    except (OSError, ValueError) as error:
        if isinstance(error, ValueError) and "Unrecognized" not in str(error):
            raise
        raise _load_error(name, error) from error
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if name in MODEL_ALIASES:  # adapters record the base by its Hub id, not the local folder it was loaded from
        model.name_or_path = model.config._name_or_path = hub_name(name)
    if num_layers is not None:
        truncate_layers(model, num_layers)
    contiguous_linear_inputs(model)  # no strided input reaches a linear layer (BERT's pooler slices one)
    if quantization is None:
        model.to(device)  # a bitsandbytes model is placed when loaded and cannot be moved
    model.eval()
    return model, tokenizer


def bitsandbytes_config(quantization: str, compute_dtype: torch.dtype):
    """The transformers ``BitsAndBytesConfig`` of ``4bit`` (NF4, double quantization) or ``8bit``."""
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "Loading a base in 4 or 8 bits needs bitsandbytes: pip install 'bayeslora[quantization]'"
        ) from error
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization must be 4bit or 8bit, got '{quantization}'")


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' progress bars on or off within the block (restored afterwards)."""
    from transformers.utils import logging

    before = logging.is_progress_bar_enabled()
    (logging.enable_progress_bar if enabled else logging.disable_progress_bar)()
    try:
        yield
    finally:
        (logging.enable_progress_bar if before else logging.disable_progress_bar)()


def _load_error(name: str, error: Exception) -> ModelLoadError:
    aliases = ", ".join(MODEL_ALIASES)
    return ModelLoadError(
        f"Cannot load model '{name}': it is not a built-in alias ({aliases}), not a local folder with a "
        f"config.json, and could not be fetched from the Hugging Face Hub (offline, or no such id). "
        f"Fix: pass one of the aliases, a local model folder, or a valid Hub id with network access. "
        f"Cause: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    )


def _layer_stack(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The ModuleList of transformer blocks: the longest one whose length is num_hidden_layers."""
    expected = model.config.num_hidden_layers
    for _module_name, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == expected:
                return module, child_name, child
    raise ValueError(f"Cannot find the {expected} transformer blocks of {type(model).__name__}.")


def truncate_layers(model: nn.Module, num_layers: int) -> None:
    """Keep the first ``num_layers`` transformer blocks, in place (config updated to match)."""
    parent, attribute, blocks = _layer_stack(model)
    if not 1 <= num_layers <= len(blocks):
        raise ValueError(f"num_layers must be in 1..{len(blocks)}, got {num_layers}.")
    setattr(parent, attribute, blocks[:num_layers])
    model.config.num_hidden_layers = num_layers
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, list):
        model.config.layer_types = layer_types[:num_layers]


def output_embedding_name(model: nn.Module) -> str | None:
    """Module name of the LM head (``lm_head`` for Llama), or None for models without one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get else None
    if head is None:
        return None
    for module_name, module in model.named_modules():
        if module is head:
            return module_name.rsplit(".", 1)[-1]
    return None


def default_target_modules(model: nn.Module) -> list[str]:
    """LoRA targets of the BLoB protocol: the attention query and value projections (PEFT's per-architecture
    defaults), plus the LM head for causal LMs (``q_proj, v_proj, lm_head`` for Llama; ``query, value`` for
    BERT)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = model.config.model_type
    targets = DEFAULTS.get(model_type)
    if not isinstance(targets, list):
        raise ValueError(
            f"No default LoRA target modules for architecture '{model_type}': pass --target-modules "
            f"(linear layers of this model: {', '.join(linear_module_names(model)[:20])})."
        )
    targets = list(targets)
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel) and type(model).__name__.endswith("ForCausalLM"):
        head = output_embedding_name(model)
        if head:
            targets.append(head)
    return targets


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct last name components of the model's linear layers (what ``target_modules`` may name)."""
    names: dict[str, None] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module_name:
            names[module_name.rsplit(".", 1)[-1]] = None
    return list(names)


def check_target_modules(model: nn.Module, targets: list[str]) -> None:
    """Raise a clear error if a target module name matches no linear layer of ``model``.

    A name matches a module whose full name equals it or ends with ``.<name>`` (PEFT's rule).
    """
    module_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    missing = [
        target for target in targets if not any(name == target or name.endswith("." + target) for name in module_names)
    ]
    if missing:
        raise ValueError(
            f"Target module(s) {', '.join(missing)} match no linear layer of {type(model).__name__}. "
            f"Fix --target-modules; this model's linear layers are: {', '.join(linear_module_names(model))}."
        )
