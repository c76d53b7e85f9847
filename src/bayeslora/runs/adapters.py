"""Adapters on a model: attach the method's PEFT adapter, save it, load it back (one or an ensemble's members)."""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

from torch import nn

from ..config import RunConfig
from ..io import write_dir_atomic
from ..methods import get_method
from ..models import check_target_modules, default_target_modules
from ..tasks import Task
from ..tuners._peft_compat import pruned_ranks_allowed
from .fingerprint import AdapterMismatchError, check_fingerprint, write_fingerprint


def attach_adapter(
    model: nn.Module, config: RunConfig, task: Task, total_steps: int = 1, adapter_name: str = "default"
):
    """Wrap ``model`` in the PEFT adapter of ``config.method`` (targets checked against the model; options
    left unset take the method's defaults). ``total_steps``: the optimizer steps of the training run (AdaLoRA
    schedules its rank budget over them)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        # PEFT's QLoRA preparation: frozen base, float layer norms, gradients through the embeddings
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    method = get_method(config.method)
    config = method.resolve(config)
    targets = config.target_modules or default_target_modules(model)
    check_target_modules(model, targets)
    task_type = "SEQ_CLS" if task.kind == "classification" else "CAUSAL_LM"
    with _quiet_peft_wrapping():
        peft_config = method.peft_config(config, targets, task_type, total_steps)
        return get_peft_model(model, peft_config, adapter_name=adapter_name), targets


@contextlib.contextmanager
def _quiet_peft_wrapping():
    """Silence two warnings of PEFT's model wrapping that do not concern users: adapting a tied ``lm_head``
    (SmolLM2) is intended, since the adapter acts on the output head only and never changes the shared
    embedding matrix; and ``is_gradient_checkpointing`` is a transformers-internal deprecation."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def load_adapter(base: nn.Module, adapter_dir: str | Path, *, force: bool = False):
    """A saved adapter on ``base`` (``PeftModel.from_pretrained``), in eval mode. A directory holding one
    sub-directory per named adapter (an ensemble's members) loads them all, the first one active.

    An adapter trained on another base model is refused (:class:`~bayeslora.fingerprint.AdapterMismatchError`
    naming both), unless ``force``; truncated or corrupt files raise :class:`AdapterFileError` naming the file.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"{adapter_dir} does not exist: there is no adapter to load (was the run finished?)")
    if (adapter_dir / "adapter_config.json").is_file():
        names = [None]
    else:
        names = sorted(p.name for p in adapter_dir.iterdir() if (p / "adapter_config.json").is_file())
        if not names:
            raise FileNotFoundError(f"{adapter_dir} holds no adapter (no adapter_config.json)")
    check_fingerprint(base, adapter_dir, force=force)
    with _quiet_peft_wrapping(), _named_load_errors(adapter_dir):
        if names == [None]:
            model = PeftModel.from_pretrained(base, str(adapter_dir))
        else:
            model = PeftModel.from_pretrained(base, str(adapter_dir / names[0]), adapter_name=names[0])
            for name in names[1:]:
                model.load_adapter(str(adapter_dir / name), adapter_name=name)
            model.set_adapter(names[0])
    model.eval()
    return model


class AdapterFileError(ValueError):
    """An adapter file that cannot be read: truncated, corrupt, or not what its name says."""


@contextlib.contextmanager
def _named_load_errors(adapter_dir: Path):
    """Turn the errors of reading damaged adapter files into messages naming the directory and the fix."""
    from safetensors import SafetensorError

    fix = "Restore the adapter from a copy, or train the run again (its config.yaml reproduces it)."
    try:
        yield
    except (SafetensorError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterFileError(f"The adapter in {adapter_dir} is truncated or corrupt ({error}). {fix}") from error
    except RuntimeError as error:
        if "size mismatch" not in str(error):
            raise
        raise AdapterMismatchError(
            f"The adapter in {adapter_dir} does not fit this base model (its weights have other shapes: it was "
            f"trained on another model, or the file was altered). {fix}\n{error}"
        ) from error


def save_adapter(model: nn.Module, path: Path) -> None:
    """Save the PEFT adapter to ``path`` atomically. Only adapter weights are written: the base model's
    embeddings are never changed (LoRA on a tied ``lm_head`` leaves the shared matrix as it is), so PEFT's
    habit of saving whole embedding matrices when an embedding-tied layer is adapted is turned off. The base
    model's fingerprint is saved beside it (see :mod:`bayeslora.fingerprint`)."""

    def write(tmp: Path) -> None:
        with pruned_ranks_allowed(model):
            model.save_pretrained(str(tmp), save_embedding_layers=False)
        write_fingerprint(model, tmp)
        custom = sorted({str(c.peft_type.value) for c in model.peft_config.values()} - {"LORA", "ADALORA"})
        if custom:  # PEFT's model card, plus how to load what PEFT alone does not know
            card = tmp / "README.md"
            card.write_text((card.read_text() if card.is_file() else "") + LOADING_NOTE.format(types=", ".join(custom)))

    write_dir_atomic(path, write)


#: Appended to the model card of a bayeslora adapter.
LOADING_NOTE = """
## Loading this adapter

This is a bayeslora adapter (PEFT type {types}); loading it needs the `bayeslora` package installed
(`pip install bayeslora`). PEFT learns these types when bayeslora is imported, so import it first:

```python
import bayeslora  # registers Me-LoRA, BLoB and B-LoRA with PEFT
from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "path/to/adapter")
```

An installed bayeslora also does the import for you when PEFT meets one of its types (a start-up hook,
`bayeslora-peft-hook.pth`; `BAYESLORA_PEFT_HOOK=0` turns that off). Where the hook cannot run (bayeslora
put on `PYTHONPATH` rather than installed, `python -S`), PEFT without the import stops with
`KeyError: '{types}'`. `bayeslora export --to lora` turns the adapter into a plain LoRA adapter (the
posterior mean; B-LoRA truncated to its learned ranks) that needs no bayeslora.
"""


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
