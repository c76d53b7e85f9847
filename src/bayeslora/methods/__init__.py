"""The methods: what ``--method`` may name. One module per method declares everything it is (see :mod:`.base`);
the imports below register them, in the order ``bayeslora methods`` lists them. Adding a method: its module, and
one line here."""

from . import lora, map, mcdropout, ensemble, laplace, melora, blob, blora, adalora, zero_shot  # noqa: F401, I001
from .base import METHODS, Method, TrainingExtras, UnknownMethodError, get_method, register_method

__all__ = ["METHODS", "Method", "TrainingExtras", "UnknownMethodError", "get_method", "register_method"]
