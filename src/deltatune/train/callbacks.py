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

__all__ = ["AdapterHooksCallback", "DatasetEpochCallback", "DeltaTrainerRunLoss", "tuner_of"]


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
    """Carries the run's training-loss sum into each checkpoint's ``trainer_state.json`` (under its class
    name in ``stateful_callbacks``), so a resumed run reports ``train_loss`` over the whole run.
    ``DeltaTrainer`` adds it and sets :attr:`train_loss_sum` before each save; being a real callback,
    transformers restores it with ``restore_callback_states_from_checkpoint`` instead of warning about it.

    Args:
        train_loss_sum: The sum of the per-step losses so far (None: not known).
    """

    def __init__(self, train_loss_sum: float | None = None) -> None:
        self.train_loss_sum = train_loss_sum

    def state(self) -> dict[str, Any]:
        """The state transformers writes into ``stateful_callbacks``."""
        return {"args": {}, "attributes": {"train_loss_sum": self.train_loss_sum}}
