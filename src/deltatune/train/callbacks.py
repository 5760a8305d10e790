"""Trainer callbacks: run the adapter method's hooks inside ``transformers.Trainer``.

transformers calls ``on_optimizer_step`` right after ``optimizer.step()`` and before ``model.zero_grad()``
(``Trainer._run_epoch``), so the gradients a method may score (AdaLoRA's triplets) are still there. At that
point ``state.global_step`` is still the 0-based index of the step just taken — the same number PEFT's
reference loop passes to ``update_and_allocate``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from ..plain_trainer import AdapterHooksCallback, tuner_of

logger = logging.getLogger(__name__)

__all__ = [
    "AdapterHooksCallback",
    "DatasetEpochCallback",
    "DeltaTrainerRunLoss",
    "stored_run_totals",
    "tuner_of",
]


class DatasetEpochCallback(TrainerCallback):
    """Tells the training dataset which epoch starts (``dataset.set_epoch(epoch)``), before the epoch's
    DataLoader workers start; ``DeltaTrainer`` adds it by itself.

    A dataset that draws its random augmentation from (seed, epoch, index) -- ``TransformedDataset`` with a
    seed -- then gives the same examples to a run resumed from ``checkpoint-N`` as to the uninterrupted run:
    the epoch is the one the checkpoint's trainer state records (``floor(state.epoch)``), not a count of
    ``set_epoch`` calls. accelerate forwards ``set_epoch`` to a dataset only when the sampler has none.
    """

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        loader = kwargs.get("train_dataloader")
        dataset = getattr(loader, "dataset", None)
        set_epoch = getattr(dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(math.floor((state.epoch or 0.0) + 1e-6))


class DeltaTrainerRunLoss(TrainerCallback, ExportableState):
    """Carries the run's totals so far into each checkpoint's ``trainer_state.json`` (under its class name in
    ``stateful_callbacks``), so a resumed run reports them over the whole run, not over its last session:
    ``train_loss`` (from the loss sum), ``train_runtime`` (the training time of the sessions, up to each
    one's last checkpoint) and the peak memory. ``DeltaTrainer`` adds it and sets its attributes before each
    save; being a real callback, transformers restores it with ``restore_callback_states_from_checkpoint``
    instead of warning about it.

    Args:
        train_loss_sum: The sum of the per-step losses so far (None: not known).
        train_runtime: Seconds of training so far, summed over the sessions (None: not known).
        peak_memory_mb: The highest peak memory of the sessions so far, in MiB (None: not measured).
    """

    def __init__(
        self,
        train_loss_sum: float | None = None,
        train_runtime: float | None = None,
        peak_memory_mb: float | None = None,
    ) -> None:
        self.train_loss_sum = train_loss_sum
        self.train_runtime = train_runtime
        self.peak_memory_mb = peak_memory_mb

    def state(self) -> dict[str, Any]:
        """The state transformers writes into ``stateful_callbacks``."""
        names = ("train_loss_sum", "train_runtime", "peak_memory_mb")
        return {"args": {}, "attributes": {name: getattr(self, name, None) for name in names}}


def stored_run_totals(state: TrainerState) -> dict[str, float | None]:
    """The totals a resumed checkpoint's trainer state recorded (see :class:`DeltaTrainerRunLoss`): each a
    number, or None when that checkpoint did not record it (an older version's)."""
    stored: Any = state.stateful_callbacks  # a dict in the JSON state (typed as a list)
    record = stored.get(DeltaTrainerRunLoss.__name__) if isinstance(stored, dict) else None
    attributes = record.get("attributes", {}) if isinstance(record, dict) else {}
    attributes = attributes if isinstance(attributes, dict) else {}
    totals: dict[str, float | None] = {}
    for name in ("train_loss_sum", "train_runtime", "peak_memory_mb"):
        value = attributes.get(name)
        totals[name] = (
            float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        )
    return totals
