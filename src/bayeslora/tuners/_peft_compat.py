"""The one place that touches PEFT internals: registering bayeslora's tuners as PEFT methods (and one PEFT
warning that does not apply to AdaLoRA's pruned ranks).

PEFT (0.20-0.21) keeps its methods in a closed enum, ``PeftType``; ``register_peft_method`` refuses a
name that is not a member. So a member is added first (``aenum.extend_enum``), then the method is
registered like PEFT's own. After that ``get_peft_model``, ``save_pretrained``, ``PeftModel.from_pretrained``,
adapter switching and merging work as for LoRA. A process that loads a saved bayeslora adapter needs
bayeslora imported (importing it runs :func:`register`); the installed package's start-up hook
(``_bayeslora_peft_hook``) imports it when PEFT looks one of these types up.
"""

from __future__ import annotations

import contextlib
import warnings

from aenum import extend_enum
from peft.utils import PeftType, register_peft_method

#: Supported PEFT versions (tested at both ends in CI).
PEFT_VERSIONS = ">=0.20,<0.22"


def ensure_peft_type(name: str) -> PeftType:
    """The ``PeftType`` member ``name.upper()``, added to the enum if PEFT does not know it."""
    member = name.upper()
    if member not in PeftType.__members__:
        extend_enum(PeftType, member, member)
    return PeftType[member]


def register(name: str, config_cls: type, model_cls: type, prefix: str) -> None:
    """Register a tuner with PEFT under ``name`` (idempotent: a second import does nothing)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = ensure_peft_type(name)
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)


@contextlib.contextmanager
def pruned_ranks_allowed(model):
    """While saving: PEFT warns that zero-sized ``lora_A``/``lora_B`` tensors are DeepSpeed/FSDP shards
    that were never gathered, but an AdaLoRA layer whose whole rank budget was pruned saves exactly such
    tensors (its ``rank_pattern`` entry is 0) and PEFT loads them back. That warning is silenced for
    AdaLoRA adapters only; every other adapter keeps it."""
    with warnings.catch_warnings():
        if any(str(c.peft_type.value) == "ADALORA" for c in getattr(model, "peft_config", {}).values()):
            warnings.filterwarnings("ignore", message=r"Adapter .* LoRA tensor\(s\) have invalid shape")
        yield
