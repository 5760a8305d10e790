"""IA³'s layer: a vector per adapter that scales the wrapped module's output, or its input on a feed-forward
module (see :mod:`.ia3` for the formula). Built on the protocol's hooks: ``transform_output`` multiplies
the base output, ``transform_input`` the input, and ``merged_weight``/``unmerged_weight`` (with
``_merge_bias``) fold the vector into the weight and bias.

Shapes of ``ia3_l`` (PEFT's): Linear and transformers' Conv1D (out, 1), or (1, in) on a feed-forward
module; ConvNd (1, out, 1, …), or (1, in, 1, …).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import TargetSpec
from ..layer_types import Conv1D, conv_groups, is_transposed
from ..layers import AdapterLayer, expect_config
from ..tuner import AdapterModel
from ._fused import is_plain
from ._ia3_fused import ia3_feedforward_linear
from .ia3 import IA3Config

__all__ = ["IA3Layer", "IA3Model", "ia3_weight_scale"]

#: Added to the vector before dividing it out of a merged weight (PEFT's guard against a zero entry).
UNMERGE_EPS = 1e-8


def ia3_weight_scale(
    vector: torch.Tensor, weight: torch.Tensor, feedforward: bool, groups: int = 1
) -> torch.Tensor:
    """The factor that multiplies ``weight`` (in its stored layout) to merge the vector ``vector``.

    Args:
        vector: ``ia3_l``: (out, 1) / (1, in) for a Linear, (1, out, 1, …) / (1, in, 1, …) for a ConvNd.
        weight: The base weight: (out, in), (in, out) for a Conv1D (see ``transposed`` below), or
            (out, in/groups, *kernel).
        feedforward: Whether the vector scales the input (columns) rather than the output (rows).
        groups: A grouped convolution's groups (its input vector is spread over each group's filters).

    Returns:
        A tensor broadcastable to ``weight``.
    """
    if weight.dim() <= 2:
        return vector  # (out, 1) scales rows, (1, in) columns; a Conv1D gets the transpose (see the layer)
    if not feedforward:
        return vector.transpose(0, 1)  # (out, 1, 1, …)
    if groups == 1:
        return vector  # (1, in, 1, …)
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    rest = vector.shape[2:]
    spread = vector.reshape(groups, 1, in_per_group, *rest).expand(
        groups, out_channels // groups, in_per_group, *rest
    )
    return spread.reshape(out_channels, in_per_group, *rest)


class IA3Layer(AdapterLayer):
    """Wraps a Linear, transformers' Conv1D, Conv2d or Conv3d (the layer types PEFT's IA³ adapts).

    Attributes:
        is_feedforward: Whether this module's vectors scale its input; fixed by the first adapter (PEFT's rule).
    """

    repr_prefix: ClassVar[str] = "ia3"
    adapter_param_names: ClassVar[tuple[str, ...]] = ("ia3_l",)
    supported_layers: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, Conv1D, nn.Conv2d, nn.Conv3d)
    transforms_input: ClassVar[bool] = True
    exact_unmerge: ClassVar[bool] = False
    ia3_l: nn.ParameterDict

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward = False

    def _get_name(self) -> str:
        """PEFT's name in ``repr`` (and ``get_layer_status``): the layer kind alone (``Linear``, ``Conv2d``)."""
        return super()._get_name().partition(".")[2]

    def add_adapter(self, adapter_name: str, target: TargetSpec) -> None:
        config = expect_config(target.config, IA3Config)
        if not self.adapter_names:
            self.is_feedforward = bool(target.options.get("is_feedforward", False))
        self._check_fan_in_fan_out(config)
        size = self.in_features if self.is_feedforward else self.out_features
        if isinstance(self.base_layer, nn.Conv2d | nn.Conv3d):
            ones = (1,) * (self.base_weight.dim() - 2)
            shape: tuple[int, ...] = (1, size, *ones)
        else:
            shape = (1, size) if self.is_feedforward else (size, 1)
        vector = torch.randn(shape).to(**self._new_dtype_device())  # drawn on the CPU, as PEFT does
        if config.init_ia3_weights:
            nn.init.ones_(vector)
        self.ia3_l[adapter_name] = nn.Parameter(vector)
        self._finish_update(adapter_name)

    def _check_fan_in_fan_out(self, config: IA3Config) -> None:
        """PEFT's correction of ``fan_in_fan_out`` to the layer's real layout, with its warning."""
        transposed = is_transposed(self.base_layer)
        if isinstance(self.base_layer, nn.Conv2d | nn.Conv3d) or config.fan_in_fan_out == transposed:
            return
        if transposed:
            message = "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True."
        else:
            message = "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False."
        warnings.warn(message, stacklevel=5)
        config.fan_in_fan_out = transposed

    # ---- forward hooks ------------------------------------------------------------------------
    def _scale(self, adapter_name: str) -> torch.Tensor:
        """The vector shaped to broadcast over an activation: (n,) on the last dim of a Linear's, (1, n, 1, …)
        on the channels of a conv's."""
        vector = self.ia3_l[adapter_name]
        return vector if vector.dim() > 2 else vector.reshape(-1)

    def fused_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        """A feed-forward plain ``nn.Linear`` (on the CPU): the vector folded into the weight's columns, one
        autograd node (:mod:`._ia3_fused`); elsewhere None, the generic path."""
        base = self.base_layer
        if not self.is_feedforward or not is_plain(base, (nn.Linear,)):
            return None
        return ia3_feedforward_linear(x, self.base_weight, self.base_bias, self.ia3_l[adapter_name])

    def transform_input(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """A feed-forward module's input times its vector (others: unchanged)."""
        if not self.is_feedforward:
            return x
        vector = self._scale(adapter_name)
        return (x.to(vector.dtype) * vector).to(x.dtype)

    def transform_output(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """An attention module's output times its vector (feed-forward modules: unchanged)."""
        if self.is_feedforward:
            return result
        vector = self._scale(adapter_name)
        return (result.to(vector.dtype) * vector).to(result.dtype)

    # ---- merging --------------------------------------------------------------------------------
    def _weight_scale(self, adapter_name: str) -> torch.Tensor:
        vector = self.ia3_l[adapter_name].detach()
        if is_transposed(self.base_layer):
            vector = vector.t()
        return ia3_weight_scale(vector, self.base_weight, self.is_feedforward, conv_groups(self.base_layer))

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """W with the vector folded in: rows (output) or columns (input) scaled."""
        return (weight * self._weight_scale(adapter_name)).to(weight.dtype)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """W with the vector divided out again (vector + 1e-8, as PEFT)."""
        return (weight / (self._weight_scale(adapter_name) + UNMERGE_EPS)).to(weight.dtype)

    def _merge_bias(self, adapter_name: str, sign: float) -> None:
        bias = self.base_bias
        if bias is None or self.is_feedforward:
            return
        vector = self.ia3_l[adapter_name].detach().reshape(bias.shape)
        merged = bias.data * vector if sign > 0 else bias.data / (vector + UNMERGE_EPS)
        bias.data.copy_(merged.to(bias.dtype))

    def unmerge(self) -> None:
        """Divides every merged vector out again; warns, as PEFT does, that this is only exact up to rounding."""
        if self.merged:
            warnings.warn("Unmerge result can be inaccurate for (IA)^3.", stacklevel=2)
        super().unmerge()

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW = merged W − W (IA³ is multiplicative: for listings and comparisons only)."""
        weight = self.base_weight.detach()
        return self.merged_weight(adapter_name, weight) - weight

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feedforward={self.is_feedforward}"


class IA3Model(AdapterModel):
    """IA³'s tuner: :class:`~deltatune.tuner.AdapterModel` plus PEFT's ``IA3Model.add_weighted_adapter``."""

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Adds ``adapter_name`` (inactive), whose vector in each layer is the weighted sum of the vectors of
        ``adapters`` held there (as PEFT; a name already taken leaves the model unchanged, as PEFT). Its config
        is the first adapter's, with the union of the adapters' ``target_modules`` and
        ``feedforward_modules``; a ``modules_to_save`` copy starts from the original module.

        Raises:
            ValueError: for an unknown adapter, adapters holding copies of one ``modules_to_save`` module,
                module lists of different kinds (list and regex string), a weight per adapter missing, or a
                module scaled on its input by one adapter and on its output by another.
        """
        if adapter_name in self.peft_config:
            return
        self._check_names(adapters, "does not exist")
        if len(weights) != len(adapters):
            raise ValueError(
                f"add_weighted_adapter needs one weight per adapter: {len(adapters)} adapters, {len(weights)} weights"
            )
        for _, wrapper in self.saved_module_wrappers():
            if sum(a in wrapper.modules_to_save for a in adapters) > 1:
                raise ValueError(
                    "Cannot add weighted adapters targeting the same module with modules_to_save."
                )
        configs = [expect_config(self.peft_config[a], IA3Config) for a in adapters]
        fields: dict[str, Any] = {}
        for field in ("target_modules", "feedforward_modules"):
            values = [getattr(c, field) for c in configs]
            if len({isinstance(v, str) for v in values}) > 1:
                raise ValueError(
                    "All adapter configs should have the same type for target and feedforward modules."
                )
            if isinstance(values[0], str):
                fields[field] = "|".join(f"({v})" for v in values)
            else:
                fields[field] = sorted(set().union(*(v or () for v in values)))
        self.inject_adapter(adapter_name, dataclasses.replace(configs[0], **fields))
        for name, layer in self.adapter_layers():
            if not isinstance(layer, IA3Layer) or adapter_name not in layer.ia3_l:
                continue
            new = layer.ia3_l[adapter_name]
            held = [(layer.ia3_l[a], w) for a, w in zip(adapters, weights, strict=True) if a in layer.ia3_l]
            if any(vector.shape != new.shape for vector, _ in held):
                self.delete_adapter(adapter_name)
                raise ValueError(
                    f"{name}: the adapters scale it on different sides (feedforward_modules differ), so their "
                    "vectors cannot be added"
                )
            with torch.no_grad():
                new.zero_()
                for vector, weight in held:
                    new.add_(vector.to(new.dtype), alpha=weight)
