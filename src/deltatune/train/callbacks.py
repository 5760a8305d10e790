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

from ..model import PeftModel
from ..tuner import AdapterModel

logger = logging.getLogger(__name__)

__all__ = ["AdapterHooksCallback", "DatasetEpochCallback", "tuner_of"]


def tuner_of(model: Any) -> AdapterModel | None:
    """The tuner of a deltatune model (a ``PeftModel`` or the tuner itself), else None."""
    if isinstance(model, PeftModel):
        return model.base_model
    if isinstance(model, AdapterModel):
        return model
    return None


class AdapterHooksCallback(TrainerCallback):
    """Calls the tuner's training hooks; ``DeltaTrainer`` adds it by itself for every deltatune model.

    - ``on_train_begin``: ``prepare_training(state.max_steps)`` (AdaLoRA fills ``total_step`` and checks its
      schedule there);
    - ``on_optimizer_step``: ``on_optimizer_step(state.global_step)`` while gradients exist (AdaLoRA's
      ``update_and_allocate``);
    - ``on_train_end``: ``training_summary()`` (logged by the method; kept as :attr:`summary`).

    Args:
        model: The model to drive; when None, the ``model`` the Trainer passes to callbacks is used.
    """

    def __init__(self, model: Any = None) -> None:
        self.model = model
        self.summary: dict[str, Any] = {}

    def _tuner(self, kwargs: dict[str, Any]) -> AdapterModel | None:
        return tuner_of(self.model if self.model is not None else kwargs.get("model"))

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        tuner = self._tuner(kwargs)
        if tuner is not None:
            tuner.prepare_training(int(state.max_steps))

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        tuner = self._tuner(kwargs)
        if tuner is None:
            return
        # fp16: a GradScaler skips the step when a gradient overflowed; those gradients hold inf/NaN and
        # must not reach the method (AdaLoRA would fold them into its importance scores for good).
        # accelerate knows already (it read the scale to decide), so asking costs no device sync.
        if bool(getattr(kwargs.get("optimizer"), "step_was_skipped", False)):
            logger.info(
                "optimizer step %d was skipped (gradient overflow): no adapter update", state.global_step
            )
            return
        tuner.on_optimizer_step(state.global_step)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        tuner = self._tuner(kwargs)
        if tuner is not None:
            self.summary = tuner.training_summary()


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
