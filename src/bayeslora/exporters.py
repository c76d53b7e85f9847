"""Moved to :mod:`bayeslora.runs.export`; this path is kept for one release."""

from .runs.export import *  # noqa: F403
