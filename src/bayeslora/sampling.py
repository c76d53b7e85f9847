"""Which example each row of a forward pass belongs to, for adapters that sample weights per example.

A scorer may run several model rows per example (cloze scoring runs one row per answer choice, and a
prefix pass with one row per distinct prompt). A Bayesian adapter must draw ONE weight sample per
example and use it on all that example's rows, or the choices of one question would be scored by
different models. Scorers announce the row -> example map around each forward pass with
:func:`rows_of_examples`; adapter layers read it with :func:`current_row_examples`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from torch import Tensor

_ROW_EXAMPLES: ContextVar[Tensor | None] = ContextVar("bayeslora_row_examples", default=None)


@contextmanager
def rows_of_examples(index: Tensor) -> Iterator[None]:
    """Within the block, row ``i`` of every forward pass belongs to example ``index[i]`` (shape (rows,))."""
    token = _ROW_EXAMPLES.set(index)
    try:
        yield
    finally:
        _ROW_EXAMPLES.reset(token)


def current_row_examples() -> Tensor | None:
    """The row -> example map of the forward pass in progress, or None (then each row is its own example)."""
    return _ROW_EXAMPLES.get()
