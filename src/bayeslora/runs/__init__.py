"""Run directories: their layout (this package's names, from :mod:`.layout`), the adapters in them
(:mod:`.adapters`), the base-model fingerprint beside each adapter (:mod:`.fingerprint`), checkpoints and resuming
(:mod:`.checkpoints`), and the formats an adapter is exported in (:mod:`.export`). Importing the package loads the
layout only."""

from .layout import (
    ADAPTER_DIR,
    BOPS_FILE,
    CONFIG_FILE,
    EVAL_DIR,
    LAPLACE_FILE,
    STRUCTURE_PLOT,
    TRAIN_LOG,
    TRAIN_SUMMARY,
    RunExistsError,
    eval_dir,
    has_adapter,
    new_run_dir,
    read_run_config,
)

__all__ = [
    "ADAPTER_DIR",
    "BOPS_FILE",
    "CONFIG_FILE",
    "EVAL_DIR",
    "LAPLACE_FILE",
    "STRUCTURE_PLOT",
    "TRAIN_LOG",
    "TRAIN_SUMMARY",
    "RunExistsError",
    "eval_dir",
    "has_adapter",
    "new_run_dir",
    "read_run_config",
]
