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
    """A JSONL task of ``n`` two-choice questions whose answer the question names ("pick the first word":
    apple, "pick the second word": river, alternating), so that a tiny model can learn it; returns ``path``."""
    rows = [
        {
            "question": f"Item {i}: pick the {'first' if i % 2 else 'second'} word.",
            "choices": ["apple", "river"],
            "answer": 0 if i % 2 else 1,
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_toy(model_dir, task, out, **options):
    """A short bayeslora run of the model in ``model_dir`` on the task file ``task``, evaluated on it, into ``out``."""
    import bayeslora as bl

    defaults = dict(rank=2, max_steps=4, batch_size=4, lr=1e-2, logging_steps=2)
    return bl.train(
        model=str(model_dir),
        task=str(task),
        eval_tasks=[str(task)],
        output_dir=str(out),
        progress=False,
        **{**defaults, **options},
    )


def tiny_llama_config(vocab_size: int = 64, **overrides):
    """The tests' Llama: 2 layers, 32 wide, 4 heads (2 key/value heads)."""
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**{**settings, **overrides})
