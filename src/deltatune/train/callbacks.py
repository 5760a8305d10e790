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

from ..plain_trainer import AdapterHooksCallback, tuner_of

logger = logging.getLogger(__name__)

__all__ = ["AdapterHooksCallback", "DatasetEpochCallback", "tuner_of"]


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
