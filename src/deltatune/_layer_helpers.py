"""Small helpers of the adapter layers: config checks, kaiming init, base weight/bias access and the
adapter dtype (re-exported by :mod:`deltatune.layers`)."""

from __future__ import annotations

import math
from typing import TypeVar

import torch
from torch import nn

from .config import PeftConfig
from .layer_types import layer_weight

__all__ = [
    "BaseLayerSlot",
    "adapter_dtype",
    "base_weight_shape",
    "expect_config",
    "is_bias_name",
    "kaiming_uniform_",
    "module_bias",
    "module_weight",
    "overwrite_",
]


ConfigT = TypeVar("ConfigT", bound=PeftConfig)


class BaseLayerSlot(nn.Module):
    """The ``base_layer`` child of an adapter layer. In a mixed model (``get_peft_model(..., mixed=True)``) layers
    of different methods nest as in PEFT: a LoHa layer's ``base_layer`` child may be a LoRA layer, so the state
    dict reads ``q.base_layer.lora_A...`` and ``q.base_layer.base_layer.weight``. Two views of that child:

    - :attr:`base_layer`: the module that is adapted, under any nested layers (its weight, type and operation,
      what every method's maths uses); PEFT's ``get_base_layer()`` (PEFT's own ``base_layer`` attribute is the
      child, which :attr:`next_layer` is here);
    - :attr:`next_layer`: the child itself, which forward calls (the nested layers add their terms first).
    """

    @property
    def base_layer(self) -> nn.Module:
        module = self._modules["base_layer"]
        while isinstance(module, BaseLayerSlot):
            module = module._modules["base_layer"]
        assert module is not None
        return module

    @base_layer.setter
    def base_layer(self, module: nn.Module) -> None:  # nn.Module.__setattr__ registers a module itself
        self._modules["base_layer"] = module

    @property
    def next_layer(self) -> nn.Module:
        module = self._modules["base_layer"]
        assert module is not None
        return module

    def get_base_layer(self) -> nn.Module:
        """The adapted module under any nested adapter layers (PEFT's ``get_base_layer``)."""
        return self.base_layer

    @property
    def nested(self) -> bool:
        """Whether another adapter layer sits between this one and the adapted module."""
        return isinstance(self._modules["base_layer"], BaseLayerSlot)

    @property
    def adapter_layer_names(self) -> tuple[str, ...]:
        """PEFT's name (``BaseTunerLayer.adapter_layer_names``) for the layer's ``adapter_param_names``: the
        attributes that hold the trainable tensors, one entry per adapter."""
        return tuple(getattr(self, "adapter_param_names", ()))

    def _all_available_adapter_names(self) -> list[str]:
        """PEFT's ``BaseTunerLayer._all_available_adapter_names``: the adapters this layer holds, sorted."""
        return sorted(getattr(self, "_held", ()))

    #: PEFT's switch: whether the input is cast to the adapter tensors' dtype before the adapter's own products
    #: (per layer; :func:`deltatune.helpers.disable_input_dtype_casting` turns it off for a while, for hooks
    #: that manage the dtypes themselves, such as layerwise casting).
    cast_input_dtype_enabled: bool = True

    def _cast_input_dtype(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x`` in ``dtype`` for the adapter's own products (PEFT's rule), or as it is where
        :attr:`cast_input_dtype_enabled` is off."""
        if not self.cast_input_dtype_enabled or x.dtype == dtype:
            return x
        return x.to(dtype)


def is_bias_name(name: str) -> bool:
    """Whether the parameter ``name`` is a bias as PEFT's ``bias="all"`` counts them: its last part holds
    ``bias`` (``.bias``, and ``nn.MultiheadAttention``'s ``in_proj_bias``, ``bias_k``, ``bias_v``)."""
    return "bias" in name.rsplit(".", 1)[-1]


def expect_config(config: PeftConfig, cls: type[ConfigT]) -> ConfigT:
    """``config``, checked to be a ``cls`` (a layer was handed another method's config otherwise).

    Raises:
        TypeError: naming both classes.
    """
    if not isinstance(config, cls):
        raise TypeError(f"expected a {cls.__name__}, got a {type(config).__name__}")
    return config


def kaiming_uniform_(tensor: torch.Tensor) -> torch.Tensor:
    """``nn.init.kaiming_uniform_(a=√5)``: U(±1/√fan_in), fan_in = shape[1]·∏shape[2:]."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


def overwrite_(weight: torch.Tensor, value: torch.Tensor) -> None:
    """``weight.data.copy_(value)`` (no autograd record), then a bump of ``weight``'s version counter, which a
    write through ``.data`` skips: what is keyed on the version (DoRA's cached norms, ‖W‖²) sees the change."""
    weight.data.copy_(value)
    if not weight.is_inference():  # inference tensors have no version counter
        torch.autograd.graph.increment_version(weight)


def module_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` as a tensor (Linear (out, in), Conv (out, in/groups, *kernel), ...; a
    ``MultiheadAttention``'s ``in_proj_weight``, see :mod:`deltatune.layer_types`).

    Raises:
        TypeError: if the module has no such tensor.
    """
    return layer_weight(module)


def module_bias(module: nn.Module) -> torch.Tensor | None:
    """``module.bias`` as a tensor, or None when the module has no bias."""
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def base_weight_shape(layer: nn.Module) -> tuple[int, ...]:
    """The weight shape of a Linear (out, in) or Conv (out, in/groups, *kernel) layer."""
    return tuple(module_weight(layer).shape)


def adapter_dtype(layer: nn.Module) -> torch.dtype:
    """Adapters are kept in fp32 when the base weight is fp16/bf16 (PEFT's ``autocast_adapter_dtype``)."""
    dtype = module_weight(layer).dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
