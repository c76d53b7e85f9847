"""When and how a forward pass samples Bayesian adapter weights.

**When.** A Bayesian adapter samples its weights in training mode (the ELBO needs a fresh sample per step)
and predicts with its posterior mean in evaluation mode: ``model.eval()`` is deterministic, so
``generate(do_sample=False)`` and two identical forward passes give the same result. Sampling in evaluation
is asked for explicitly, with :func:`sampling` (a new sample at every forward pass) or
:func:`frozen_samples` (one sample per sequence, kept for every pass inside the block: the tokens that
``generate`` produces one at a time, and their key/value cache, all see the same weights).
:func:`posterior_mean` forces the mean, in training too.

**How.** Three facts travel from the code that runs the model to the adapter layers, which only see
activations:

* **rows -> examples.** A scorer may run several model rows per example (a cloze scorer runs one packed
  row per question, a letter scorer one row per question). A Bayesian adapter draws ONE weight sample per
  example and uses it on all that example's rows; otherwise the choices of one question would be scored
  by different models. Scorers announce the map with :func:`rows_of_examples`.
* **examples -> posterior copies.** To average N posterior samples in one pass, a batch of B examples is
  tiled N times (examples ``k·B .. k·B+B-1`` form copy ``k``). Methods whose sample is shared by a whole
  forward pass in their reference implementation (BLoB draws one noise matrix per pass) draw one per
  copy instead; :func:`sample_copies` announces B.
* **frozen noise.** Inside :func:`frozen_samples`, layers draw their noise through :func:`frozen_noise`,
  which returns the same tensor for the same layer and adapter until the block ends.

Adapter layers read these with :func:`should_sample`, :func:`current_row_examples`,
:func:`current_row_copies` and :func:`frozen_noise`. Outside any block each row is its own example and
there is one copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

_ROW_EXAMPLES: ContextVar[Tensor | None] = ContextVar("bayeslora_row_examples", default=None)
_EXAMPLES_PER_COPY: ContextVar[int | None] = ContextVar("bayeslora_examples_per_copy", default=None)
#: True: sample (also in evaluation mode); False: the posterior mean (also in training mode); None: the module's mode
_SAMPLE: ContextVar[bool | None] = ContextVar("bayeslora_sample", default=None)
_FROZEN: ContextVar[dict[tuple[int, str], Tensor] | None] = ContextVar("bayeslora_frozen_noise", default=None)
#: Inside :func:`noise_at_zero`: the zero noise leaves handed out so far, by (layer, name)
_AT_ZERO: ContextVar[dict[tuple[int, str], Tensor] | None] = ContextVar("bayeslora_noise_at_zero", default=None)


@contextmanager
def _setting(var: ContextVar, value) -> Iterator[None]:
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def rows_of_examples(index: Tensor) -> AbstractContextManager[None]:
    """Within the block, row ``i`` of every forward pass belongs to example ``index[i]`` (shape (rows,))."""
    return _setting(_ROW_EXAMPLES, index)


def sample_copies(examples_per_copy: int) -> AbstractContextManager[None]:
    """Within the block, examples are grouped in posterior copies of ``examples_per_copy`` each."""
    return _setting(_EXAMPLES_PER_COPY, examples_per_copy)


def posterior_mean() -> AbstractContextManager[None]:
    """Within the block, Bayesian adapters predict with their posterior mean (no sampling), in training too."""
    return _setting(_SAMPLE, False)


def sampling() -> AbstractContextManager[None]:
    """Within the block, Bayesian adapters draw new weights at every forward pass, in evaluation mode too.

    Each example (see :func:`rows_of_examples`) gets its own sample; for one sample per sequence across
    several passes (generation), use :func:`frozen_samples`.
    """
    return _setting(_SAMPLE, True)


@contextmanager
def frozen_samples() -> Iterator[None]:
    """Within the block, Bayesian adapters sample, and every layer draws its noise once: all forward passes
    in the block use the same weight sample per sequence (row, or example if announced), so a sequence
    generated token by token, with its key/value cache, sees one model throughout. Every pass in the block
    must hold the same number of sequences."""
    with _setting(_SAMPLE, True), _setting(_FROZEN, {}):
        yield


@contextmanager
def noise_at_zero() -> Iterator[dict[tuple[int, str], Tensor]]:
    """Within the block, Bayesian layers take the sampling path with their standard normal noise ε set to zero, as
    leaf tensors that require grad: the pass computes the prediction at the posterior mean, and the gradients with
    respect to the leaves are those with respect to ε at ε = 0, the Jacobian of a linearised predictive (a weight
    w = μ + σ·ε has ∂f/∂ε = σ·∂f/∂w). Yields the leaves, keyed by (id of the layer, noise name), as the pass
    creates them; each layer gets one leaf per name for every pass in the block, as in :func:`frozen_samples`."""
    store: dict[tuple[int, str], Tensor] = {}
    with _setting(_SAMPLE, True), _setting(_AT_ZERO, store):
        yield store


def should_sample(training: bool) -> bool:
    """Whether a Bayesian layer in ``training`` mode samples its weights in the forward pass in progress."""
    forced = _SAMPLE.get()
    return training if forced is None else forced


def frozen_noise(owner: object, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Standard normal noise of ``shape`` (device and dtype of ``like``): new at every call, or inside
    :func:`frozen_samples` drawn at the first call for ``(owner, name)`` and returned unchanged after (inside
    :func:`noise_at_zero`: zeros that require grad, likewise kept).

    Raises:
        RuntimeError: inside :func:`frozen_samples`, when a later pass asks for another shape (a different
            number of sequences than the first pass).
    """
    at_zero = _AT_ZERO.get()
    store = at_zero if at_zero is not None else _FROZEN.get()
    if store is None:
        return torch.randn(shape, device=like.device, dtype=like.dtype)
    key = (id(owner), name)
    noise = store.get(key)
    if noise is None and at_zero is not None:
        noise = store[key] = torch.zeros(shape, device=like.device, dtype=like.dtype, requires_grad=True)
    elif noise is None:
        noise = store[key] = torch.randn(shape, device=like.device, dtype=like.dtype)
    elif tuple(noise.shape) != tuple(shape):
        raise RuntimeError(
            f"frozen posterior samples were drawn for {noise.shape[0]} sequences, but this forward pass has "
            f"{shape[0]}: every pass inside frozen_samples() must hold the same sequences (start a new block "
            f"for a new batch)"
        )
    return noise


def current_row_examples() -> Tensor | None:
    """The row -> example map of the forward pass in progress, or None (each row is its own example)."""
    return _ROW_EXAMPLES.get()


def current_row_copies() -> Tensor | None:
    """The row -> posterior copy map of the forward pass in progress, or None (a single copy)."""
    rows, per_copy = _ROW_EXAMPLES.get(), _EXAMPLES_PER_COPY.get()
    if rows is None or per_copy is None:
        return None
    return rows // per_copy


def frozen() -> bool:
    """Whether :func:`frozen_samples` (or :func:`noise_at_zero`) is in force."""
    return _FROZEN.get() is not None or _AT_ZERO.get() is not None
