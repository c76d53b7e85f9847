"""How a forward pass samples Bayesian adapter weights: per example, per posterior copy, or the mean.

Three facts travel from the code that runs the model to the adapter layers, which only see activations:

* **rows -> examples.** A scorer may run several model rows per example (a cloze scorer runs one packed
  row per question, a letter scorer one row per question). A Bayesian adapter draws ONE weight sample per
  example and uses it on all that example's rows; otherwise the choices of one question would be scored
  by different models. Scorers announce the map with :func:`rows_of_examples`.
* **examples -> posterior copies.** To average N posterior samples in one pass, a batch of B examples is
  tiled N times (examples ``k·B .. k·B+B-1`` form copy ``k``). Methods whose sample is shared by a whole
  forward pass in their reference implementation (BLoB draws one noise matrix per pass) draw one per
  copy instead; :func:`sample_copies` announces B.
* **mean mode.** Inside :func:`posterior_mean`, adapters use their posterior mean and draw nothing.

Adapter layers read these with :func:`current_row_examples`, :func:`current_row_copies` and
:func:`use_posterior_mean`. Outside any block each row is its own example, there is one copy, and
adapters sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar

from torch import Tensor

_ROW_EXAMPLES: ContextVar[Tensor | None] = ContextVar("bayeslora_row_examples", default=None)
_EXAMPLES_PER_COPY: ContextVar[int | None] = ContextVar("bayeslora_examples_per_copy", default=None)
_MEAN: ContextVar[bool] = ContextVar("bayeslora_posterior_mean", default=False)


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
    """Within the block, Bayesian adapters predict with their posterior mean (no sampling)."""
    return _setting(_MEAN, True)


def current_row_examples() -> Tensor | None:
    """The row -> example map of the forward pass in progress, or None (each row is its own example)."""
    return _ROW_EXAMPLES.get()


def current_row_copies() -> Tensor | None:
    """The row -> posterior copy map of the forward pass in progress, or None (a single copy)."""
    rows, per_copy = _ROW_EXAMPLES.get(), _EXAMPLES_PER_COPY.get()
    if rows is None or per_copy is None:
        return None
    return rows // per_copy


def use_posterior_mean() -> bool:
    """Whether adapters should use their posterior mean instead of sampling."""
    return _MEAN.get()
