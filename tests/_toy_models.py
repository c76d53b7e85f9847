"""Toy modules and task files for tests, importable without bayeslora (export tests load adapters in fresh
processes)."""

from __future__ import annotations

import json

from torch import nn


class TwoLayers(nn.Module):
    """Two linear layers, ``q`` (16 -> 12) then ``v`` (12 -> 16): targets for adapters."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(16, 12)
        self.v = nn.Linear(12, 16)

    def forward(self, x):
        return self.v(self.q(x))


def write_word_task(path, n: int):
    """A JSONL task of ``n`` two-choice questions ("apple" or "river", alternating answers); returns ``path``."""
    rows = [{"question": f"Item {i}: which word?", "choices": ["apple", "river"], "answer": i % 2} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
