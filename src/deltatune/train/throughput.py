"""Throughput per epoch (samples/s) and accelerator utilisation, logged and kept in the run's history.

A GPU that waits for data shows it here first: the samples per second of an epoch fall below what the
adapter step alone allows, and utilisation sits well under 100%.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

__all__ = ["ThroughputCallback", "gpu_utilization"]


def gpu_utilization(device: int | None = None) -> float | None:
    """The CUDA GPU's current utilisation in percent (NVML, through torch), or None when unavailable."""
    if not torch.cuda.is_available():
        return None
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # pynvml missing, or a driver without NVML
        return None


class _Sampler:
    """Polls :func:`gpu_utilization` of ``device`` in a daemon thread (every ``interval`` seconds) and
    averages it. The device is fixed when the sampler is made: a new thread's current CUDA device is 0,
    not the training process's."""

    def __init__(self, device: int, interval: float = 0.5) -> None:
        self.device = device
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            value = gpu_utilization(self.device)
            if value is None:
                return
            self.samples.append(value)

    def start(self) -> _Sampler:
        self._thread.start()
        return self

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join(timeout=2 * self.interval)
        return sum(self.samples) / len(self.samples) if self.samples else None


class ThroughputCallback(TrainerCallback):
    """Logs each epoch's training samples per second (and the mean GPU utilisation on CUDA) and appends
    ``{"epoch", "step", "train_samples_per_second_epoch", "gpu_utilization"}`` to ``state.log_history``.

    Samples are counted from the optimiser steps taken (per-device batch × accumulation × processes), at most
    the training set's size (a partial last batch or accumulation holds fewer; the console's epoch line shows
    this same record), over the epoch's wall time: data loading, forward, backward and the optimiser, and any evaluation or saving
    that ``eval_strategy="steps"``/``save_strategy="steps"`` run inside the epoch (an ``"epoch"`` strategy runs
    them after ``on_epoch_end``, so they are not counted).
    """

    def __init__(self) -> None:
        self._start = 0.0
        self._first_step = 0
        self._sampler: _Sampler | None = None
        self._num_train: int | None = None
        self.epochs: list[dict[str, Any]] = []

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._start = time.perf_counter()
        self._first_step = state.global_step
        self._num_train = _dataset_size(kwargs.get("train_dataloader"))
        self._sampler = None
        if gpu_utilization() is not None:
            self._sampler = _Sampler(torch.cuda.current_device()).start()

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        steps = state.global_step - self._first_step
        samples = steps * args.train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
        if self._num_train:
            samples = min(samples, self._num_train)
        utilization = self._sampler.stop() if self._sampler is not None else None
        record: dict[str, Any] = {
            "epoch": round(float(state.epoch or 0.0), 4),
            "step": state.global_step,
            "train_samples_per_second_epoch": round(samples / elapsed, 2),
        }
        if utilization is not None:
            record["gpu_utilization"] = round(utilization, 1)
        self.epochs.append(record)
        state.log_history.append(record)
        gpu = f", GPU {utilization:.0f}% busy" if utilization is not None else ""
        # On the console only with a GPU: its utilisation is news there; samples/s alone is already a
        # column of the epoch line, so without one it goes to the run's log file only.
        logger.log(
            logging.INFO if utilization is not None else logging.DEBUG,
            "epoch %.2f: %.1f samples/s%s",
            record["epoch"],
            record["train_samples_per_second_epoch"],
            gpu,
        )


def _dataset_size(loader: Any) -> int | None:
    """How many examples one epoch of ``loader`` holds (its dataset's length), or None when it has none."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None
