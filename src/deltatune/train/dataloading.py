"""DataLoader settings that keep an accelerator busy, chosen from the cores this process may use.

transformers' defaults (no worker processes, no prefetching beyond the current batch) load every batch in
the training process, between steps: on a GPU the device then waits for the CPU. When training runs on an
accelerator and the user left the loader settings alone, :func:`apply_accelerator_defaults` gives each
training process its share of the cores as persistent workers (forked once, not every epoch), pinned memory
(asynchronous host-to-device copies) and a deeper prefetch queue. CPU runs are left as they are: there the
workers would compete with the training threads for the same cores.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_WORKERS",
    "PREFETCH_FACTOR",
    "apply_accelerator_defaults",
    "available_cores",
    "loader_settings_left_alone",
]

#: More workers than this rarely help one GPU and cost memory (each holds a copy of the dataset object).
MAX_WORKERS = 16
#: Batches each worker prepares ahead.
PREFETCH_FACTOR = 4


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def loader_settings_left_alone(args: Any) -> bool:
    """True when ``args`` holds transformers' default loader settings (no workers, no persistence, no
    prefetch factor): the user chose nothing deltatune would override."""
    return (
        int(getattr(args, "dataloader_num_workers", 0) or 0) == 0
        and not getattr(args, "dataloader_persistent_workers", False)
        and getattr(args, "dataloader_prefetch_factor", None) is None
    )


def apply_accelerator_defaults(
    args: Any, cores: int | None = None, processes_per_node: int | None = None
) -> str:
    """Sets workers, persistence, pinning and prefetching on ``args`` for a run on an accelerator; returns
    the one-line reason (also logged).

    Args:
        args: ``TrainingArguments``, changed in place.
        cores: Cores to share (default: this process's affinity).
        processes_per_node: Training processes sharing them (default: ``LOCAL_WORLD_SIZE``, else 1).
    """
    cores = available_cores() if cores is None else cores
    if processes_per_node is None:
        processes_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    share = max(1, cores // max(1, processes_per_node))
    workers = max(1, min(MAX_WORKERS, share - 1))  # one core stays with the training process
    args.dataloader_num_workers = workers
    args.dataloader_persistent_workers = True
    args.dataloader_pin_memory = True
    args.dataloader_prefetch_factor = PREFETCH_FACTOR
    reason = (
        f"data loading: {workers} worker processes (persistent, pinned memory, prefetch {PREFETCH_FACTOR}) of "
        f"{cores} cores for {processes_per_node} training process(es); --dataloader_num_workers N changes it"
    )
    logger.info(reason)
    return reason
