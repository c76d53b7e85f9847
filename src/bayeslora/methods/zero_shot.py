"""``zero-shot``: a base model evaluated as it is, without an adapter (``bayeslora eval --model``)."""

from __future__ import annotations

from .base import Method, register_method


class ZeroShot(Method):
    """No adapter, nothing trained, one deterministic prediction."""

    name = "zero-shot"
    description = "the base model without an adapter (evaluation only: bayeslora eval --model)"
    trains = False


METHOD = register_method(ZeroShot())
