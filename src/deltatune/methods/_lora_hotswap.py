"""LoRA's side of hot-swapping (:mod:`deltatune.utils.hotswap`, PEFT's ``peft.utils.hotswap``): what the
generic swap asks of a layer, mixed into LoRA's layers (Linear, Conv1D, ConvNd, Embedding,
MultiheadAttention).

- :meth:`LoraHotswapMixin.scalings_to_tensors`: each adapter's scale s becomes a 0-d tensor, changed in place
  by a later swap, so a compiled graph (which would bake a Python float in as a constant and recompile when
  it changes) reads the new value. The forward paths fold a tensor s into B (one small multiply; a float s
  stays the GEMM's ``alpha`` and costs nothing).
- :meth:`LoraHotswapMixin.pad_rank`: A and B padded with zeros to a common rank R (B A is unchanged), so a
  later adapter of any rank r ≤ R fits the same shapes. On a grouped conv, B's r inputs are split into one
  block per group, so A's rows are padded block by block.
- :meth:`LoraHotswapMixin.swap_in`: copies a new adapter's tensors into the existing ones (a smaller rank
  into the leading rank slots, the rest zero) and sets s from the new rank and alpha.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..layer_types import conv_groups

__all__ = ["LoraHotswapMixin", "copy_rank_slots"]


def copy_rank_slots(dst: torch.Tensor, src: torch.Tensor, rank_dim: int, groups: int = 1) -> None:
    """``dst`` ← ``src`` with ``src``'s (smaller) rank dimension ``rank_dim`` in ``dst``'s leading slots and zeros
    elsewhere; with ``groups`` > 1 the rank dimension is ``groups`` blocks, each filled from its leading slots."""
    with torch.no_grad():
        dst.zero_()
        if groups > 1:
            dst, src = dst.unflatten(rank_dim, (groups, -1)), src.unflatten(rank_dim, (groups, -1))
            rank_dim += 1
        dst.narrow(rank_dim, 0, src.shape[rank_dim]).copy_(src.to(dst.dtype))


def _weight(item: Any) -> torch.Tensor:
    """The weight of a factor module, or the factor itself when it is a parameter (Embedding)."""
    if isinstance(item, nn.Module):
        weight: Any = item.weight
        return weight
    return item


class LoraHotswapMixin:
    """The hot-swap hooks of LoRA's layers (see the module docstring); LoRA's layer classes inherit it."""

    #: Whether the layer's forward takes a tensor scale (False for DoRA, whose paths need a float).
    tensor_scaling: ClassVar[bool] = True
    base_layer: nn.Module
    adapter_param_names: ClassVar[tuple[str, ...]]
    r: dict[str, int]
    scaling: dict[str, float]

    # ---- the tensors ----------------------------------------------------------------------------------
    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) weights of ``adapter_name``: rank in A's dim 0 and B's dim 1."""
        a, b = (getattr(self, n)[adapter_name] for n in self.adapter_param_names[:2])
        return _weight(a), _weight(b)

    def _rank_dim(self, attr: str) -> tuple[int, int]:
        """(rank dimension, rank groups) of the tensors under ``attr`` (A: rows, in blocks on a grouped conv)."""
        if attr == self.adapter_param_names[0]:
            return 0, conv_groups(self.base_layer)
        return 1, 1

    def rank_capacity(self) -> int:
        """The largest rank the adapters' tensors hold (after padding, the padded rank)."""
        return max((self._factors(name)[0].shape[0] for name in self.r), default=0)

    # ---- preparing ------------------------------------------------------------------------------------
    def scalings_to_tensors(self) -> None:
        """Each adapter's scale as a 0-d tensor on the adapter's device.

        Raises:
            ValueError: for a layer whose forward needs a float scale (DoRA).
        """
        if not self.tensor_scaling:
            raise ValueError(
                f"{type(self).__name__} (DoRA, use_dora=True) cannot be prepared for compiled hot-swapping: its "
                "scale must stay a float; hot-swap it without prepare_model_for_compiled_hotswap"
            )
        for name, value in self.scaling.items():
            if not isinstance(value, torch.Tensor):
                device = self._factors(name)[0].device
                self.scaling[name] = torch.tensor(float(value), device=device)  # type: ignore[assignment]

    def pad_rank(self, target_rank: int) -> None:
        """Zero-pads every adapter's A and B to rank ``target_rank`` (the output is unchanged)."""
        groups = conv_groups(self.base_layer)
        if target_rank % groups:
            raise ValueError(
                f"Trying to pad a {type(self.base_layer).__name__} LoRA adapter with groups={groups} to target rank "
                f"{target_rank}, but the target rank is not divisible by {groups}. Please choose a target rank that "
                f"is divisible by {groups}."
            )
        for name in list(self.r):
            a_attr, b_attr = self.adapter_param_names[:2]
            if self._factors(name)[0].shape[0] == target_rank:
                continue
            old_a: Any = getattr(self, a_attr)[name]
            old_b: Any = getattr(self, b_attr)[name]
            new_a, new_b = self._new_factors(old_a, old_b, target_rank)
            for attr, old, new in ((a_attr, old_a, new_a), (b_attr, old_b, new_b)):
                rank_dim, rank_groups = self._rank_dim(attr)
                new_w, old_w = _weight(new), _weight(old)
                copy_rank_slots(new_w, old_w, rank_dim, rank_groups)
                new_w.requires_grad_(old_w.requires_grad)
                old_bias = getattr(old, "bias", None) if isinstance(old, nn.Module) else None
                if isinstance(old_bias, torch.Tensor) and isinstance(new, nn.Module):
                    new.bias = old_bias
                getattr(self, attr)[name] = new

    def _new_factors(self, old_a: Any, old_b: Any, rank: int) -> tuple[Any, Any]:
        """Zero (A, B) of rank ``rank`` like ``old_a``/``old_b``: parameters for an Embedding, else copies of the
        factor modules (Linear or conv: their kernel, stride, padding, groups) with a new rank and weight."""
        if not isinstance(old_a, nn.Module):  # Embedding: A (r, num_embeddings), B (dim, r) parameters
            return (
                nn.Parameter(old_a.new_zeros(rank, *old_a.shape[1:])),
                nn.Parameter(old_b.new_zeros(old_b.shape[0], rank, *old_b.shape[2:])),
            )
        new_a, new_b = copy.deepcopy(old_a), copy.deepcopy(old_b)
        weight_a, weight_b = _weight(old_a), _weight(old_b)
        new_a.weight = nn.Parameter(weight_a.new_zeros(rank, *weight_a.shape[1:]))
        new_b.weight = nn.Parameter(
            weight_b.new_zeros(weight_b.shape[0], rank // getattr(old_b, "groups", 1), *weight_b.shape[2:])
        )
        for module, attr in (
            (new_a, "out_features"),
            (new_a, "out_channels"),
            (new_b, "in_features"),
            (new_b, "in_channels"),
        ):
            if hasattr(module, attr):
                setattr(module, attr, rank)
        return new_a, new_b

    def scale_for(self, r: int, alpha: float, config: Any) -> float:
        """The scale of an adapter of rank ``r`` and ``alpha`` under ``config`` (LoRA's layers define it)."""
        raise NotImplementedError

    # ---- swapping -------------------------------------------------------------------------------------
    def swap_in(
        self, adapter_name: str, tensors: Mapping[str, torch.Tensor], r: int, alpha: float, config: Any
    ) -> None:
        """Copies the new adapter's ``tensors`` (keys relative to this layer, ``lora_A.default.weight``) into
        ``adapter_name`` in place and sets its scale for rank ``r`` and ``alpha``.

        Raises:
            ValueError: for a tensor of larger rank than a prepared (compiled hot-swap) layer holds.
        """
        prepared = isinstance(self.scaling[adapter_name], torch.Tensor)
        module: Any = self
        for key, new in tensors.items():
            old = module.get_parameter(key)
            if old.shape == new.shape:
                with torch.no_grad():
                    old.copy_(new.to(old.dtype))
            elif all(o >= n for o, n in zip(old.shape, new.shape, strict=True)):
                rank_dim, groups = self._rank_dim(key.split(".", 1)[0])
                groups = groups if old.shape[rank_dim] != new.shape[rank_dim] else 1  # a bias is not split
                copy_rank_slots(old, new.to(old.device), rank_dim, groups)
            elif prepared:
                raise ValueError(
                    f"the new adapter's {key} has shape {tuple(new.shape)}, a larger rank than the {tuple(old.shape)} "
                    "that prepare_model_for_compiled_hotswap prepared; call it with a target_rank at least the "
                    "largest rank of the adapters to swap in"
                )
            else:  # a larger rank, uncompiled: the parameter takes the new shape (as PEFT does)
                old.data = new.to(device=old.device, dtype=old.dtype)
        value = self.scale_for(r, alpha, config)
        current: Any = self.scaling[adapter_name]
        if isinstance(current, torch.Tensor):
            current.fill_(value)
        else:
            self.scaling[adapter_name] = value
