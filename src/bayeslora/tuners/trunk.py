"""N posterior samples that share one pass through the deterministic trunk.

N posterior samples of a batch run as one forward pass over the batch tiled N times (rows ``k·R .. k·R + R - 1``
form copy ``k``, see :mod:`bayeslora.sampling`). When only the top blocks carry the posterior
(``bayesian_layers="last:K"``, :mod:`bayeslora.tuners.blocks`), every copy computes the same hidden states below
the first Bayesian block. Inside :func:`shared_trunk` those blocks run on copy 0's rows only and the hidden states
are tiled where the posterior begins: every tensor a block receives whose first dimension is the tiled row count
(hidden states, attention mask, rotary embeddings, position ids) is cut to copy 0 below the first Bayesian block,
and every tensor with copy 0's row count is tiled from it on (at the last block's output when only the head is
Bayesian). The result is that of the tiled pass, at the cost of one pass through the trunk. It is exact when the
N copies hold the same inputs, as the tiled batches of the predictive do; generation, whose copies diverge token
by token, does not use it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from .base import BayesianLowRankLayer
from .blocks import block_stack, is_bayesian_module, parse_bayesian_layers


def samples_weights(module: nn.Module) -> bool:
    """Whether ``module`` is an adapter layer with an active Bayesian (weight-sampling) adapter."""
    if not isinstance(module, BayesianLowRankLayer):
        return False
    return any(module._has(a) and module.stochastic.get(a, True) for a in module.active_adapters)


def first_bayesian_block(model: nn.Module) -> int | None:
    """The index of the first block of the model's stack with a weight-sampling adapter (the stack's length when
    only modules after it sample), or None when no trunk can be shared: the model has no stack, block 0 samples,
    nothing samples, or a sampling module is registered before the stack (so runs before it)."""
    stack = block_stack(model)
    if stack is None:
        return None
    name, blocks = stack
    prefix = f"{name}."
    first: int | None = None
    after_stack = False
    for key, module in model.named_modules():
        inside = key.startswith(prefix)
        after_stack = after_stack or inside
        if not samples_weights(module):
            continue
        if inside:
            index = int(key[len(prefix) :].split(".", 1)[0])
            first = index if first is None else min(first, index)
        elif not after_stack:
            return None
        elif first is None:
            first = len(blocks)
    return first if first else None


@contextmanager
def sampled_layers(model: nn.Module, spec: str = "all") -> Iterator[None]:
    """Within the block, of the posterior the model carries only the layers that ``bayesian_layers=spec`` names
    draw weights (``last:K``: those of the top K blocks and outside the stack, the LM head); the Bayesian layers
    below predict with their posterior mean, so the blocks below the top K form a deterministic trunk that N
    samples share (:func:`shared_trunk`). An approximation at prediction of a posterior trained in more layers
    (the lower layers' noise is left out); ``"all"`` changes nothing. The layers are restored on exit."""
    if parse_bayesian_layers(spec, "sample_layers") is None:
        yield
        return
    stochastic = [
        (key, module, adapter)
        for key, module in model.named_modules()
        if isinstance(module, BayesianLowRankLayer)
        for adapter, on in module.stochastic.items()
        if on
    ]
    silenced = [
        (module, adapter)
        for key, module, adapter in stochastic
        if not is_bayesian_module(key, model, spec, "sample_layers")
    ]
    if stochastic and not silenced:
        warnings.warn(
            f"sample_layers={spec!r} samples every layer that carries this model's posterior (they are all in its "
            f"top blocks or outside the stack): the same as sample_layers='all'.",
            UserWarning,
            stacklevel=3,
        )
    for module, adapter in silenced:
        module.stochastic[adapter] = False
    try:
        yield
    finally:
        for module, adapter in silenced:
            module.stochastic[adapter] = True


def _map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor inside it (tuples, lists and dicts walked)."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, tuple | list):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _resize_rows(rows_from: int, rows_to: int) -> Callable[[Tensor], Tensor]:
    """Cut (``rows_to < rows_from``: copy 0's rows) or tile (``rows_to > rows_from``) every tensor of at least two
    dimensions whose first dimension is ``rows_from``."""

    def resize(tensor: Tensor) -> Tensor:
        if tensor.dim() < 2 or tensor.shape[0] != rows_from:
            return tensor
        if rows_to < rows_from:
            return tensor[:rows_to]
        return tensor.repeat(rows_to // rows_from, *([1] * (tensor.dim() - 1)))

    return resize


def _first_tensor(args: tuple, kwargs: dict[str, Any]) -> Tensor:
    for value in (*args, kwargs.get("hidden_states")):
        if isinstance(value, Tensor):
            return value
    raise RuntimeError("shared_trunk: a block was called without a hidden-state tensor")


@contextmanager
def shared_trunk(model: nn.Module, copies: int, enabled: bool = True) -> Iterator[bool]:
    """Within the block, a forward pass over a batch tiled ``copies`` times runs the blocks below the first Bayesian
    one on copy 0 only (see the module docstring). Yields whether the trunk is shared (a model whose posterior
    starts at block 0, or ``copies`` ≤ 1, or ``enabled=False``: the pass runs as it is)."""
    first = first_bayesian_block(model) if enabled and copies > 1 else None
    if first is None:
        yield False
        return
    _, blocks = block_stack(model)
    rows: dict[str, int] = {}

    def below(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if module is blocks[0]:
            tiled = _first_tensor(args, kwargs).shape[0]
            if tiled % copies:
                raise RuntimeError(f"shared_trunk: {tiled} rows are not {copies} copies of a batch")
            rows["copy"] = tiled // copies
        cut = _resize_rows(rows["copy"] * copies, rows["copy"])
        return _map_tensors(args, cut), _map_tensors(kwargs, cut)

    def above(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        tile = _resize_rows(rows["copy"], rows["copy"] * copies)
        return _map_tensors(args, tile), _map_tensors(kwargs, tile)

    def after_last(module: nn.Module, args: tuple, output: Any) -> Any:
        return _map_tensors(output, _resize_rows(rows["copy"], rows["copy"] * copies))

    handles = [block.register_forward_pre_hook(below, with_kwargs=True) for block in blocks[:first]]
    handles += [block.register_forward_pre_hook(above, with_kwargs=True) for block in blocks[first:]]
    if first == len(blocks):
        handles.append(blocks[-1].register_forward_hook(after_last))
    try:
        yield True
    finally:
        for handle in handles:
            handle.remove()
