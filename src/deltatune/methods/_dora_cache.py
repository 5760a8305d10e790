"""DoRA's norm cache: ‖W + ΔW‖ per adapter, kept in eval mode while caching is on
(:class:`deltatune.helpers.DoraCaching`, PEFT's helper); see :mod:`deltatune._weight_cache` for when an
entry is still served. The cache is ``_dora_cache`` (PEFT's name), a dict on every DoRA layer; switching the
layer's mode (``train()`` or ``eval()``) empties it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._weight_cache import WeightCache, cached_value, weight_caching_enabled

__all__ = ["DoraCacheMixin"]


class DoraCacheMixin(nn.Module):
    """Gives a DoRA layer its ``_dora_cache`` and :meth:`cached_norm` (the layer provides ``base_weight``,
    ``adapter_param_names`` and ``scaling``)."""

    @property
    def _dora_cache(self) -> WeightCache:
        """The layer's cache (created on first use, so a LoRA layer turned into a DoRA one in place has it)."""
        cache = self.__dict__.get("_dora_cache_entries")
        if cache is None:
            cache = self.__dict__["_dora_cache_entries"] = WeightCache()
        return cache

    def train(self, mode: bool = True) -> DoraCacheMixin:
        """As ``nn.Module.train``; empties the cache (in either direction, so ``model.eval()`` starts afresh)."""
        self._dora_cache.clear()
        return super().train(mode)

    def _norm_inputs(self, adapter_name: str) -> tuple[list[torch.Tensor], Any]:
        """What the norms of ``adapter_name`` depend on: the base weight, every tensor of the adapter (the
        magnitude too: harmless) and the scale."""
        layer: Any = self
        tensors = [layer.base_weight]
        for attr in layer.adapter_param_names:
            container = getattr(layer, attr)
            if adapter_name in container:
                item = container[adapter_name]
                tensors.extend(item.parameters() if isinstance(item, nn.Module) else [item])
        scaling = layer.scaling[adapter_name]
        if isinstance(scaling, torch.Tensor):  # a tensor scale (hot-swapping) is one more input
            return [*tensors, scaling], None
        return tensors, scaling

    def cached_norm(self, adapter_name: str, compute: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """``compute(adapter_name)`` (the detached norms of W + ΔW), served from the cache while nothing it
        depends on changed (with caching on, in eval mode)."""
        if torch.compiler.is_compiling():
            return compute(adapter_name)
        idle = self.training or not weight_caching_enabled()
        if idle and not self.__dict__.get("_dora_cache_entries"):  # the default path: nothing to do
            return compute(adapter_name)
        return cached_value(
            self._dora_cache,
            f"weight-norm-{adapter_name}",
            lambda: self._norm_inputs(adapter_name),
            lambda: compute(adapter_name),
            self.training,
        )
