"""Augmentation randomness as a pure function of (seed, epoch, index), so that neither the number of
DataLoader workers nor resuming a run from a checkpoint changes which crop or flip an example gets.

Drawing augmentations from the process's global generator ties them to everything else that consumed it
(dropout, the sampler) and, with DataLoader workers, to each worker's own seed: a run resumed from
``checkpoint-N`` then sees other crops than the uninterrupted run did. A :class:`TransformedDataset` given a
``seed`` instead draws each example's augmentation from :func:`sample_generator`, seeded from the run's seed,
the epoch (set by the trainer through ``set_epoch``) and the example's index.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["SharedEpoch", "apply_seeded", "sample_generator"]


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator whose state depends only on ``(seed, epoch, index)`` (mixed by numpy's
    ``SeedSequence``, so neighbouring indices or epochs get unrelated streams)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(2)
    generator = torch.Generator()
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return generator


class SharedEpoch:
    """The current epoch, shared with DataLoader worker processes (also persistent ones, which keep the
    dataset copy they started with): the value lives in a shared-memory tensor that pickles by reference."""

    def __init__(self, epoch: int = 0) -> None:
        self._value = torch.full((), int(epoch), dtype=torch.int64).share_memory_()

    def get(self) -> int:
        return int(self._value)

    def set(self, epoch: int) -> None:
        self._value.fill_(int(epoch))

    def __getstate__(self) -> dict[str, Any]:
        return {"_value": self._value}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._value = state["_value"]


def apply_seeded(transform: Any, image: Any, generator: torch.Generator) -> Any:
    """``transform(image)`` drawing its randomness from ``generator``: passed along when the transform takes
    one (``accepts_generator``), else torch's global generator is seeded from it for the call and restored."""
    if getattr(transform, "accepts_generator", False):
        return transform(image, generator=generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        return transform(image)
