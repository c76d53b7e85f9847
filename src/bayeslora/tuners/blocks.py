"""The model's stack of repeated blocks, and which of them carry the posterior (``bayesian_layers``).

``bayesian_layers="all"`` (the default) puts the posterior in every adapted layer. ``"last:K"`` puts it only in the
adapted layers of the top K blocks and in those outside the stack (the LM head, a classification head); the
adapters of the blocks below are deterministic (their posterior mean alone: LoRA's function class). ``"last:0"``
leaves the posterior in the head only. Below the first Bayesian block every posterior sample computes the same
hidden states, so N samples need that trunk only once (:mod:`bayeslora.tuners.trunk`).
"""

from __future__ import annotations

import re
import warnings

from torch import nn

#: The attribute names under which transformers models keep their blocks (Llama ``layers``, BERT ``layer``, GPT-2
#: ``h``, others ``blocks``).
BLOCK_LIST_NAMES = ("layers", "layer", "h", "blocks", "block")

_LAST = re.compile(r"last:(\d+)")


def parse_bayesian_layers(spec: str, option: str = "bayesian_layers") -> int | None:
    """The number K of top blocks that carry the posterior (``"last:K"``), or None for ``"all"``.

    Raises:
        ValueError: for any other text, naming the two forms (and ``option``, the setting that held it).
    """
    if spec == "all":
        return None
    match = _LAST.fullmatch(spec.strip()) if isinstance(spec, str) else None
    if match is None:
        raise ValueError(
            f"{option} must be 'all' or 'last:K' (the top K blocks and the head carry the posterior; "
            f"'last:0' the head only), got {spec!r}"
        )
    return int(match.group(1))


def block_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(qualified name, blocks)`` of the model's stack of repeated blocks: the longest ``nn.ModuleList`` named as
    in :data:`BLOCK_LIST_NAMES`, or None when the model has none."""
    stacks = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) and name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES
    ]
    return max(stacks, key=lambda stack: len(stack[1]), default=None)


def block_index(key: str, stack_name: str) -> int | None:
    """The index of the block that holds the module named ``key`` (both names relative to the same root), or None
    for a module outside the stack."""
    prefix = f"{stack_name}." if stack_name else ""
    if not key.startswith(prefix):
        return None
    head = key[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _required_stack(model: nn.Module, spec: str, option: str) -> tuple[str, nn.ModuleList]:
    stack = block_stack(model)
    if stack is None:
        raise ValueError(
            f"{option}={spec!r} needs a model with a stack of blocks (a ModuleList named "
            f"{', '.join(BLOCK_LIST_NAMES)}); {type(model).__name__} has none: use {option}='all'"
        )
    return stack


def is_bayesian_module(key: str, model: nn.Module, spec: str, option: str = "bayesian_layers") -> bool:
    """Whether the adapted module ``key`` of ``model`` carries the posterior under ``option=spec``
    (``bayesian_layers`` or ``sample_layers``): always with ``all`` and outside the block stack, else when its block
    is among the top K.

    Raises:
        ValueError: for ``last:K`` on a model without a block stack, naming ``option``.
    """
    last = parse_bayesian_layers(spec, option)
    if last is None:
        return True
    name, blocks = _required_stack(model, spec, option)
    index = block_index(key, name)
    return index is None or index >= len(blocks) - last


def warn_if_every_block(model: nn.Module, spec: str, option: str = "bayesian_layers") -> None:
    """Warn when ``option="last:K"`` names at least as many blocks as ``model`` has: it is then the same as
    ``"all"``, which is probably not what was meant."""
    last = parse_bayesian_layers(spec, option)
    if last is None:
        return
    blocks = len(_required_stack(model, spec, option)[1])
    if last >= blocks:
        warnings.warn(
            f"{option}={spec!r} names every block of this model (it has {blocks}): the same as {option}='all'. "
            f"Give K < {blocks} for a deterministic trunk below the top K blocks.",
            UserWarning,
            stacklevel=3,
        )
