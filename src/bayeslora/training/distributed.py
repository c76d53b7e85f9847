"""Training on several processes (``accelerate launch`` or ``torchrun``): who writes, and independent samples.

The transformers Trainer (through accelerate) does the distributed work: it wraps the model in DDP (or FSDP,
DeepSpeed), shards the data with a seeded sampler and averages gradients. What bayeslora adds:

* **one writer**: the main process creates the run directory and writes every file (configuration, logs,
  adapter, evaluation); the others train, then wait for it at a barrier;
* **independent samples**: the Trainer seeds every process alike, so each process re-seeds the global
  generator with ``seed + 1_000_003·rank`` when training starts, and the weight samples of Me-LoRA, BLoB,
  the B-LoRA gates and dropout masks differ across ranks (the data order has its own seeded generator
  and is unaffected);
* the KL term is divided by the *global* number of training examples on every process; since DDP averages
  gradients over processes, it is counted once per example, as in a single process.
"""

from __future__ import annotations

import os

import torch
from transformers import TrainerCallback

#: Multiplies the rank in the per-process seed (a prime, so that nearby seeds never collide).
RANK_STRIDE = 1_000_003


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process: from ``torch.distributed`` once it is initialised, else from
    the environment ``torchrun`` / ``accelerate launch`` set, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return world()[0] == 0


def start() -> None:
    """Initialise the process group when launched on several processes (the Trainer would do it later;
    bayeslora needs it earlier, to let the main process create the run directory first)."""
    if world()[1] > 1:
        from accelerate import PartialState

        from ..models import default_device

        PartialState(cpu=default_device().type == "cpu")  # several CPU processes: gloo (accelerate's MULTI_CPU)


def barrier() -> None:
    """Wait for every process (nothing on a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class PerRankSeed(TrainerCallback):
    """Re-seed the global generator with ``seed + RANK_STRIDE·rank`` when training starts (multi-process only)."""

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        rank, size = world()
        if size > 1:
            torch.manual_seed(args.seed + RANK_STRIDE * rank)
