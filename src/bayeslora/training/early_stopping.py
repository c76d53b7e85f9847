"""Early stopping on held-out training examples: keep the adapter of the epoch whose held-out NLL is lowest.

After every epoch the model predicts training examples the run does not train on (the same held-out examples that
temperature scaling and a held-out Laplace prior are fitted on) with its posterior mean, and the adapter's state
is kept whenever their NLL is the lowest so far; at the end of training that state is put back, so that the run
saves, evaluates and exports the adapter of its best epoch. With a patience, training stops once that many epochs
pass without a new best. The choice and its history are saved into every checkpoint, so a resumed run keeps them.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from ..evaluation.metrics import negative_log_likelihood
from ..evaluation.predictive import predict
from ..evaluation.scoring import Scorer
from ..io import write_text_atomic

#: Files in a checkpoint: the best epoch's adapter state, and the history of held-out NLLs.
BEST_STATE_FILE = "early_stopping_best.safetensors"
HISTORY_FILE = "early_stopping.json"


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy (on the CPU) of the active adapter's weights and buffers, as PEFT saves them."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=model.active_adapter, save_embedding_layers=False)
    return {key: value.detach().to("cpu", copy=True).contiguous() for key, value in state.items()}


class EarlyStopping(TrainerCallback):
    """Evaluate the held-out NLL after every epoch, keep the best epoch's adapter, put it back when training ends.

    Args:
        scorer: the run's scorer.
        heldout: training examples the run does not train on.
        patience: stop after this many epochs without a lower held-out NLL (None: train every epoch).
        batch_size: examples per held-out batch.
        checkpoint: a checkpoint the run resumes from, whose saved choice is continued.
    """

    runs_before_method_callbacks = True  # the best epoch is back before the method's end-of-training work

    def __init__(
        self,
        scorer: Scorer,
        heldout: Sequence,
        patience: int | None = None,
        batch_size: int = 16,
        checkpoint: Path | None = None,
    ) -> None:
        if not heldout:
            raise ValueError("early stopping needs held-out examples")
        self.scorer, self.heldout, self.patience, self.batch_size = scorer, list(heldout), patience, batch_size
        self.history: list[dict[str, float]] = []
        self.best_state: dict[str, torch.Tensor] | None = None
        if checkpoint is not None and (checkpoint / HISTORY_FILE).is_file():
            self.history = json.loads((checkpoint / HISTORY_FILE).read_text())["history"]
            if (checkpoint / BEST_STATE_FILE).is_file():
                self.best_state = load_file(str(checkpoint / BEST_STATE_FILE))
        elif checkpoint is not None:  # an older version's checkpoint, saved as its process was killed
            warnings.warn(
                f"early stopping: {checkpoint / HISTORY_FILE} is missing, so the epochs before {checkpoint.name} are "
                "not among those it chooses from; the run will not match an uninterrupted one. For an exact "
                f"continuation delete {checkpoint} and resume from the checkpoint before it.",
                UserWarning,
                stacklevel=2,
            )

    @property
    def best(self) -> dict[str, float] | None:
        """The epoch with the lowest held-out NLL so far: ``{"epoch", "step", "heldout_nll"}``."""
        return min(self.history, key=lambda entry: entry["heldout_nll"]) if self.history else None

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        was_training = model.training
        prediction = predict(model, self.scorer, self.heldout, n_samples=0, batch_size=self.batch_size, progress=False)
        model.train(was_training)
        nll = negative_log_likelihood(prediction.probs, prediction.labels)
        best = self.best
        self.history.append({"epoch": round(state.epoch or 0), "step": state.global_step, "heldout_nll": nll})
        if best is None or nll < best["heldout_nll"]:
            self.best_state = _adapter_state(model)
        elif self.patience is not None and len(self.history) - 1 - self.history.index(self.best) >= self.patience:
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            if self.best_state is not None:
                save_file(self.best_state, str(checkpoint / BEST_STATE_FILE))
            write_text_atomic(checkpoint / HISTORY_FILE, json.dumps({"history": self.history}) + "\n")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        """Put the best epoch's adapter back (before the other callbacks' end-of-training work)."""
        from peft.utils import set_peft_model_state_dict

        if self.best_state is not None:
            device = next(model.parameters()).device
            state_dict = {key: value.to(device) for key, value in self.best_state.items()}
            set_peft_model_state_dict(model, state_dict, adapter_name=model.active_adapter)

    def record(self) -> dict[str, Any]:
        """What the training summary records: the chosen epoch, its held-out NLL, the history."""
        best = self.best or {}
        return {
            "best_epoch": best.get("epoch"),
            "best_step": best.get("step"),
            "heldout_nll": best.get("heldout_nll"),
            "epochs_run": len(self.history),
            "heldout_examples": len(self.heldout),
            "history": self.history,
        }
