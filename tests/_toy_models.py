"""Toy modules for tests, importable without bayeslora (export tests load adapters in fresh processes)."""

from __future__ import annotations

from torch import nn


class TwoLayers(nn.Module):
    """Two linear layers, ``q`` (16 -> 12) then ``v`` (12 -> 16): targets for adapters."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(16, 12)
        self.v = nn.Linear(12, 16)

    def forward(self, x):
        return self.v(self.q(x))
