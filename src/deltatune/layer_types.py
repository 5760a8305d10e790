"""Per-layer-type glue: how each kind of module an adapter can wrap looks to the adapter maths.

Every adapter method thinks in one layout, the weight as (out, in[, *kernel]), and one operation, "the base
layer's op with another weight". This module maps the module types PEFT adapts onto that:

==========================  ==============================  ===================================================
module                      weight as stored                (in_features, out_features)
==========================  ==============================  ===================================================
``nn.Linear``               (out, in)                       (in_features, out_features)
transformers ``Conv1D``     (in, out) — ``fan_in_fan_out``  weight.shape
``nn.Conv1d/2d/3d``         (out, in/groups, *kernel)       (in_channels, out_channels)
``nn.Embedding``            (num_embeddings, dim)           (num_embeddings, embedding_dim)
``nn.MultiheadAttention``   in_proj_weight (3·E, E)         (E, 3·E); its ``out_proj`` is a plain Linear
==========================  ==============================  ===================================================

Nothing here knows a method; the methods' layers call these helpers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = [
    "CONV_TYPES",
    "LINEAR_TYPES",
    "Conv1D",
    "apply_with_weight",
    "conv_groups",
    "from_out_in",
    "in_out_features",
    "is_linear_like",
    "is_transposed",
    "layer_weight",
    "to_out_in",
]

#: Convolutions an adapter can wrap (weights (out, in/groups, *kernel)).
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Layers PEFT's ``"all-linear"`` selects: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2).
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


def is_transposed(module: nn.Module) -> bool:
    """Whether the module stores its weight as (in, out) (transformers ``Conv1D``; PEFT's ``fan_in_fan_out``)."""
    return isinstance(module, Conv1D)


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``"all-linear"`` should select the module (``nn.Linear`` or ``Conv1D``)."""
    return isinstance(module, LINEAR_TYPES)


def conv_groups(module: nn.Module) -> int:
    """The ``groups`` of a convolution (1 for any other module)."""
    groups: Any = getattr(module, "groups", 1) if isinstance(module, CONV_TYPES) else 1
    return int(groups)


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The weight an adapter changes: ``weight``, or ``in_proj_weight`` for a ``MultiheadAttention``.

    Raises:
        TypeError: when the module has no such tensor (e.g. an MHA with separate q/k/v weights).
    """
    name = "in_proj_weight" if isinstance(module, nn.MultiheadAttention) else "weight"
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no {name} tensor")
    return weight


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) as PEFT reports them for ``module`` (see the table above)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, CONV_TYPES):
        return module.in_channels, module.out_channels  # type: ignore[return-value]
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim, 3 * module.embed_dim
    weight = layer_weight(module)
    if is_transposed(module):
        return int(weight.shape[0]), int(weight.shape[1])
    return int(weight.shape[1]), int(weight.shape[0])


def to_out_in(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (in the module's stored layout) as (out, in[, *kernel]): transposed for ``Conv1D``."""
    return weight.t() if is_transposed(module) else weight


def from_out_in(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_out_in`: an (out, in[, *kernel]) tensor in the module's stored layout."""
    return weight.t() if is_transposed(module) else weight


def apply_with_weight(
    module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The module's operation on ``x`` with ``weight`` (in its stored layout) and ``bias`` instead of its own.

    Linear: ``x Wᵀ + b``; Conv1D: ``x W + b``; ConvNd: the convolution with the module's stride, padding,
    padding mode, dilation and groups; Embedding: the lookup with its padding index and max-norm options.

    Raises:
        TypeError: for a module type without a weight-swapped form (e.g. ``MultiheadAttention``).
    """
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    if is_transposed(module):
        return F.linear(x, weight.t(), bias)
    if isinstance(module, CONV_TYPES):
        conv: Any = module
        return conv._conv_forward(x, weight, bias)  # pads exactly as the module does ("reflect", ...)
    if isinstance(module, nn.Embedding):
        out = F.embedding(
            x,
            weight,
            module.padding_idx,
            module.max_norm,
            module.norm_type,
            module.scale_grad_by_freq,
            module.sparse,
        )
        return out if bias is None else out + bias
    raise TypeError(f"no weight-swapped forward for {type(module).__name__}")
