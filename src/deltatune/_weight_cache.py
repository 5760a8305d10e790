"""Inference caches of values computed from weights (DoRA's weight norms), and the process-wide switch that
:class:`deltatune.helpers.DoraCaching` turns (PEFT's ``peft.helpers.DoraCaching``).

A layer keeps its cache in a plain dict. :func:`cached_value` serves an entry only while caching is on, the
layer is in eval mode and every tensor the value was computed from is unchanged: the same storage (still
alive: a weak reference tells), data pointer, shape, dtype and device, and the same version counter, which
every in-place write through autograd bumps (optimiser steps, ``load_state_dict``, adapter loading, edits
under ``torch.no_grad()``, merging and unmerging); a tensor replaced through ``param.data = ...`` has another
storage. A write through ``tensor.data`` bypasses the version counter: call ``model.eval()`` (which empties the
caches) after one. Under ``torch.compile`` nothing is cached (the compiled graph recomputes).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["WeightCache", "cached_value", "set_weight_caching", "weight_caching_enabled"]


class WeightCache(dict[str, Any]):
    """A layer's cache: a dict that copies and pickles as an empty one (its entries hold weak references to
    the storages of one model's tensors, meaningless in a copy)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> WeightCache:
        return type(self)()

    def __copy__(self) -> WeightCache:
        return type(self)()

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), ())


_switch = {"enabled": False}


def weight_caching_enabled() -> bool:
    """Whether layers may cache values computed from their weights (in eval mode only)."""
    return _switch["enabled"]


def set_weight_caching(enabled: bool) -> None:
    """Turns the caching on or off for the whole process (off: the caches empty on their next use)."""
    _switch["enabled"] = bool(enabled)


def _stamp(tensors: Sequence[torch.Tensor], extra: Hashable) -> tuple[Any, ...] | None:
    """What identifies the tensors' current contents, or None where it cannot be told (inference tensors keep
    no version counter)."""
    if any(t.is_inference() for t in tensors):
        return None
    parts = tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in tensors)
    return (*parts, extra, torch.is_inference_mode_enabled())


def cached_value(
    cache: WeightCache,
    key: str,
    inputs: Callable[[], tuple[Sequence[torch.Tensor], Hashable]],
    compute: Callable[[], torch.Tensor],
    training: bool,
) -> torch.Tensor:
    """``compute()``, or the value stored under ``key`` in ``cache`` when it was computed from the same inputs,
    unchanged (see the module doc), with caching on and not ``training``. With caching off or in training,
    ``cache`` is emptied and nothing is stored (PEFT's rule); then ``inputs`` is not even called, so the
    default path costs one flag test.

    Args:
        cache: The layer's cache (entries: key → (storage references, stamp, value)).
        key: The value's name in the cache (e.g. ``"weight-norm-default"``).
        inputs: Gives every tensor the value depends on and anything else it depends on (hashable, compared by
            equality, e.g. the scale).
        compute: Computes the value (detached: it is kept across calls).
        training: The layer's ``training`` flag.

    Returns:
        The value.
    """
    if training or not _switch["enabled"] or torch.compiler.is_compiling():
        if cache and not torch.compiler.is_compiling():
            cache.clear()
        return compute()
    tensors, extra = inputs()
    stamp = _stamp(tensors, extra)
    if stamp is None:
        return compute()
    entry = cache.get(key)
    if entry is not None and entry[1] == stamp and not any(ref.expired() for ref in entry[0]):
        return entry[2]
    try:
        refs = [StorageWeakRef(t.untyped_storage()) for t in tensors]
    except (RuntimeError, NotImplementedError, TypeError):  # a tensor without a plain storage: no caching
        return compute()
    value = compute()
    cache[key] = (refs, stamp, value)
    return value
