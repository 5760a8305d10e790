"""Generic helpers for one training run: the optimiser steps ``Trainer`` will plan, the evaluation it already
logged for the final model, and the peak memory of a block."""

from __future__ import annotations

import logging
import math
import os
import threading
from typing import Any

import torch
import transformers

logger = logging.getLogger(__name__)

__all__ = ["MIN_STEPS_PER_EPOCH", "PeakMemory", "fit_batch", "logged_final_evaluation", "planned_steps"]


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on a GPU, else the process's peak resident set size
    (sampled every 20 ms) above its size at entry. ``peak_mb`` holds the result in MiB."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self.kind = "cuda" if torch.cuda.is_available() else "rss"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _rss_mb() -> float:
        try:
            with open("/proc/self/statm", encoding="ascii") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            return 0.0

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated() / 2**20
        else:
            self._start = self._rss_mb()
            self._peak = self._start

            def sample() -> None:
                while not self._stop.wait(0.02):
                    self._peak = max(self._peak, self._rss_mb())

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def so_far_mb(self) -> float:
        """The peak so far, inside the block (MiB above its start)."""
        if self.kind == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20 - self._start
        return max(self._peak, self._rss_mb()) - self._start

    def __exit__(self, *exc: Any) -> None:
        if self.kind == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20 - self._start
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_mb = max(self._peak, self._rss_mb()) - self._start


def planned_steps(args: transformers.TrainingArguments, num_train: int) -> int:
    """The optimiser steps ``Trainer`` will plan for ``num_train`` examples (its own formula)."""
    if args.max_steps > 0:
        return int(args.max_steps)
    per_process = math.ceil(num_train / max(args.world_size, 1))
    batches = (
        per_process // args.train_batch_size
        if args.dataloader_drop_last
        else math.ceil(per_process / args.train_batch_size)
    )
    ga = args.gradient_accumulation_steps
    per_epoch = max(batches // ga + int(batches % ga > 0), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def logged_final_evaluation(trainer: transformers.Trainer) -> dict[str, Any] | None:
    """The evaluation the Trainer already logged for the model it ended with, or None if there is none.

    With ``load_best_model_at_end`` that is the evaluation at the best checkpoint's step; otherwise the one
    at the last step. Reusing it saves a second pass over the evaluation set (the model, data and eval
    mode are the same, so the numbers would be too).
    """
    state, args = trainer.state, trainer.args
    if args.load_best_model_at_end and state.best_model_checkpoint:
        try:
            step = int(str(state.best_model_checkpoint).rstrip("/").rsplit("-", 1)[1])
        except (IndexError, ValueError):
            return None
    else:
        step = state.global_step
    for entry in reversed(state.log_history):
        if entry.get("step") == step and "eval_loss" in entry:
            return {k: v for k, v in entry.items() if k != "step"}
    return None


#: A batch that leaves fewer optimiser steps than this per epoch is shrunk by :func:`fit_batch`.
MIN_STEPS_PER_EPOCH = 8


def fit_batch(args: transformers.TrainingArguments, num_train: int) -> str | None:
    """Shrinks a recipe's batch (``per_device_train_batch_size`` × ``gradient_accumulation_steps`` × processes)
    that would give fewer than :data:`MIN_STEPS_PER_EPOCH` optimiser steps per epoch on ``num_train``
    examples: accumulation goes to 1 and the per-device batch to the largest power of two that gives at
    least that many steps. ``args`` is changed in place; the one-line notice is logged and returned (None
    when the batch already fits).

    Only for batch sizes the user did not choose (a recipe's defaults); an explicit choice is never changed.
    """
    world = max(int(args.world_size), 1)
    per_device, accumulation = int(args.per_device_train_batch_size), int(args.gradient_accumulation_steps)
    effective = per_device * accumulation * world
    steps = math.ceil(num_train / effective)
    if steps >= MIN_STEPS_PER_EPOCH or num_train <= 0:
        return None
    fitted = 1
    while fitted * 2 <= min(per_device, num_train / (MIN_STEPS_PER_EPOCH * world)):
        fitted *= 2
    args.per_device_train_batch_size = fitted
    args.gradient_accumulation_steps = 1
    new_steps = math.ceil(num_train / (fitted * world))
    message = (
        f"{num_train} training images: the recipe's batch {per_device} x {accumulation}"
        f"{f' x {world} processes' if world > 1 else ''} = {effective} would give {steps} optimiser "
        f"step{'s' if steps != 1 else ''} per epoch, so it is fitted to {fitted} x 1 ({new_steps} steps per "
        "epoch); pass --per_device_train_batch_size and --gradient_accumulation_steps to choose yourself"
    )
    logger.warning(message)
    return message
