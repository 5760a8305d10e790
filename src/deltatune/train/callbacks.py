"""Trainer callbacks: AdaLoRA's budget allocation, run inside ``transformers.Trainer``.

transformers calls ``on_optimizer_step`` right after ``optimizer.step()`` and before ``model.zero_grad()``
(``Trainer._run_epoch``), so the gradients AdaLoRA scores its triplets with are still there. At that
point ``state.global_step`` is still the 0-based index of the step just taken — the same number PEFT's
reference loop passes to ``update_and_allocate``.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..methods.adalora import AdaLoraConfig, AdaLoraModel
from ..model import PeftModel

logger = logging.getLogger(__name__)

__all__ = ["AdaLoraCallback", "rank_summary"]


def _tuner(model: Any) -> AdaLoraModel:
    if isinstance(model, PeftModel) and isinstance(model.base_model, AdaLoraModel):
        return model.base_model
    if isinstance(model, AdaLoraModel):
        return model
    raise ValueError(
        f"AdaLoraCallback needs a deltatune PeftModel holding an AdaLoRA adapter, got {type(model).__name__}"
    )


def rank_summary(rank_pattern: dict[str, list[bool]] | None) -> dict[str, int]:
    """``{"<module>": kept rank}`` from an AdaLoRA ``rank_pattern``."""
    return {
        k.removesuffix(".lora_E"): int(sum(bool(v) for v in keep)) for k, keep in (rank_pattern or {}).items()
    }


class AdaLoraCallback(TrainerCallback):
    """Drives AdaLoRA inside a Trainer run; ``DeltaTrainer`` adds it by itself for AdaLoRA models.

    - ``on_train_begin``: fills ``total_step`` from the trainer's planned optimiser steps when the config
      lacks it, then checks that the tinit/tfinal schedule fits.
    - ``on_optimizer_step``: ``update_and_allocate(state.global_step)`` while gradients exist.
    - ``on_train_end``: stores the final ``rank_pattern`` in the adapter config (it is saved with the adapter).

    Args:
        model: The PeftModel to drive; when None, the ``model`` the Trainer passes to callbacks is used.
    """

    def __init__(self, model: PeftModel | None = None) -> None:
        self.model = model

    def _resolve(self, kwargs: dict[str, Any]) -> AdaLoraModel:
        return _tuner(self.model if self.model is not None else kwargs.get("model"))

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        tuner = self._resolve(kwargs)
        config = tuner.peft_config[tuner.active_adapter]
        assert isinstance(config, AdaLoraConfig)
        if config.total_step is None:
            config.total_step = int(state.max_steps)
            logger.info(
                "AdaLoRA: total_step set to the trainer's planned %d optimiser steps", config.total_step
            )
        elif config.total_step != state.max_steps:
            logger.warning(
                "AdaLoRA: total_step=%d but the trainer plans %d optimiser steps; the budget schedule follows "
                "total_step",
                config.total_step,
                state.max_steps,
            )
        config.check_schedule(config.total_step)
        logger.info(
            "AdaLoRA: ranks %d → %d on average; pruning between steps %d and %d, every %d steps",
            config.init_r,
            config.target_r,
            config.tinit,
            config.total_step - config.tfinal,
            config.deltaT,
        )

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._resolve(kwargs).update_and_allocate(state.global_step)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        tuner = self._resolve(kwargs)
        ranks = rank_summary(tuner.current_rank_pattern())
        if ranks:
            logger.info(
                "AdaLoRA: final ranks sum %d over %d modules (min %d, max %d)",
                sum(ranks.values()),
                len(ranks),
                min(ranks.values()),
                max(ranks.values()),
            )
