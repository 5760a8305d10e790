"""The adapter layer: wraps a frozen ``base_layer`` and adds the active adapters' deltas.

Shared by every method: forward dispatch (disabled / merged / unmerged), merge and unmerge, safe
merge, adapter bookkeeping (several named adapters, active set, deletion) and trainability. A method's
layer subclass only creates its parameters (:meth:`AdapterLayer.update_layer`), builds its ΔW
(:meth:`AdapterLayer.delta_weight`) and computes its additive output (:meth:`AdapterLayer.adapter_output`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig, PeftConfig

__all__ = [
    "AdapterLayer",
    "LowRankLayer",
    "base_weight_shape",
    "expect_config",
    "kaiming_uniform_",
    "module_bias",
    "module_weight",
]


ConfigT = TypeVar("ConfigT", bound=PeftConfig)


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


def module_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` as a tensor (Linear (out, in), Conv (out, in/groups, *kernel), ...).

    Raises:
        TypeError: if the module has no tensor ``weight``.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight


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


class AdapterLayer(nn.Module):
    """Base class of the layers that wrap a targeted module.

    Args:
        base_layer: The module being adapted (``nn.Linear`` or ``nn.Conv2d``); kept frozen as a child.

    Attributes:
        r: Rank per adapter name.
        scaling: Scale per adapter name (never serialized).
        active_adapters: Names used in forward.
        merged_adapters: Names currently folded into the base weight, in merge order.
        disable_adapters: When True, forward returns the base output only.
    """

    #: Names of the ``ModuleDict``/``ParameterDict`` attributes that hold trainable adapter tensors.
    adapter_param_names: ClassVar[tuple[str, ...]] = ()
    #: Names of per-adapter attributes that hold non-trainable state (e.g. AdaLoRA's ``ranknum``).
    other_param_names: ClassVar[tuple[str, ...]] = ()
    #: Module types this method can adapt.
    supported_layers: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Conv2d)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not isinstance(base_layer, self.supported_layers):
            names = ", ".join(t.__name__ for t in self.supported_layers)
            raise TypeError(
                f"{type(self).__name__} cannot adapt a {type(base_layer).__name__}; supported layer types: {names}"
            )
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        #: Further per-adapter dicts of a method (name → {adapter → value}), cleaned on deletion.
        self._extra_per_adapter: dict[str, dict[str, Any]] = {}

    # ---- to be provided by each method ------------------------------------------------------
    def update_layer(self, adapter_name: str, config: AdapterConfig, r: int, alpha: float) -> None:
        """Creates the tensors of ``adapter_name`` with rank ``r`` and scale numerator ``alpha``."""
        raise NotImplementedError

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW of ``adapter_name``, scaling included, with the base weight's shape (computed in fp32 or the
        adapter dtype)."""
        raise NotImplementedError

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The additive term of ``adapter_name`` for input ``x``: equals ``base_op(x, ΔW)`` (no bias)."""
        raise NotImplementedError

    # ---- shared machinery -------------------------------------------------------------------
    @property
    def base_weight(self) -> torch.Tensor:
        """The base layer's weight: (out, in) for a Linear, (out, in/groups, *kernel) for a conv."""
        return module_weight(self.base_layer)

    @property
    def base_bias(self) -> torch.Tensor | None:
        """The base layer's bias, if it has one."""
        return module_bias(self.base_layer)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (so code that reads ``layer.weight`` keeps working)."""
        return self.base_weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return self.base_bias

    @property
    def merged(self) -> bool:
        """True when at least one adapter is merged into the base weight."""
        return bool(self.merged_adapters)

    @property
    def adapter_names(self) -> list[str]:
        """Every adapter this layer holds."""
        return list(self.r)

    def _adapter_containers(self) -> list[nn.ModuleDict | nn.ParameterDict]:
        return [getattr(self, n) for n in (*self.adapter_param_names, *self.other_param_names)]

    def _new_dtype_device(self) -> dict[str, Any]:
        return {"dtype": adapter_dtype(self.base_layer), "device": self.base_weight.device}

    def _finish_update(self, adapter_name: str) -> None:
        """Makes a freshly created adapter active (its tensors were created on the base's device)."""
        if adapter_name not in self.active_adapters:
            self.active_adapters.append(adapter_name)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The trainable tensors of ``adapter_name`` in this layer."""
        params: list[nn.Parameter] = []
        for attr in self.adapter_param_names:
            container = getattr(self, attr)
            if adapter_name in container:
                item = container[adapter_name]
                params.extend(item.parameters() if isinstance(item, nn.Module) else [item])
        return params

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Activates ``adapter_names`` (only those held here) and makes exactly their tensors trainable."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in self.adapter_names:
            for p in self.adapter_parameters(name):
                p.requires_grad_(name in names)
        self.active_adapters = [n for n in names if n in self.r]

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes ``adapter_name`` (unmerging it first if merged)."""
        if adapter_name in self.merged_adapters:
            self.unmerge()
        for container in self._adapter_containers():
            if adapter_name in container:
                del container[adapter_name]
        self.r.pop(adapter_name, None)
        self.scaling.pop(adapter_name, None)
        for per_adapter in self._extra_per_adapter.values():
            per_adapter.pop(adapter_name, None)
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Folds the adapters into the base weight (W ← :meth:`merged_weight`, W + ΔW by default).

        Args:
            safe_merge: Check the merged weight for NaN/inf first and raise ``ValueError`` (W untouched).
            adapter_names: Adapters to merge; default the active ones. Already merged ones are skipped.
        """
        names = self.active_adapters if adapter_names is None else adapter_names
        weight = self.base_weight
        for name in names:
            if name not in self.r or name in self.merged_adapters:
                continue
            with torch.no_grad():
                merged = self.merged_weight(name, weight.data)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(
                        f"merging adapter {name!r} would put NaN/inf into the base weight; the weight was "
                        "left unchanged"
                    )
                weight.data.copy_(merged)
                self._merge_bias(name, sign=1.0)
            self.merged_adapters.append(name)

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """The base weight with ``adapter_name`` folded in, as a new tensor (default W + ΔW); a method whose
        merge is not additive (DoRA's column rescaling) overrides this and :meth:`unmerged_weight`."""
        return weight + self.delta_weight(adapter_name).to(weight.dtype)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`merged_weight` (default W − ΔW)."""
        return weight - self.delta_weight(adapter_name).to(weight.dtype)

    def _merge_bias(self, adapter_name: str, sign: float) -> None:
        """Hook for methods that also change the bias when merging (LoRA's ``lora_bias``)."""

    def unmerge(self) -> None:
        """Undoes every merge in reverse order (W ← :meth:`unmerged_weight`)."""
        weight = self.base_weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                weight.data.copy_(self.unmerged_weight(name, weight.data))
                self._merge_bias(name, sign=-1.0)

    def base_forward_with_weight(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Applies the base layer's operation with ``weight`` instead of its own (and ``bias``, default none)."""
        base = self.base_layer
        if isinstance(base, nn.Linear):
            return F.linear(x, weight, bias)
        if isinstance(base, nn.Conv2d | nn.Conv1d) and base.padding_mode != "zeros":
            return base._conv_forward(x, weight, bias)  # pads as the base does ("reflect", ...)
        if isinstance(base, nn.Conv2d):
            return F.conv2d(x, weight, bias, base.stride, base.padding, base.dilation, base.groups)
        if isinstance(base, nn.Conv1d):
            return F.conv1d(x, weight, bias, base.stride, base.padding, base.dilation, base.groups)
        raise TypeError(f"no weight-swapped forward for {type(base).__name__}")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        names = [name for name in self.active_adapters if name in self.r]
        if len(names) == 1 and not args and not kwargs:
            fused = self.fused_forward(x, names[0])
            if fused is not None:
                return fused
        result = self.base_layer(x, *args, **kwargs)
        for name in names:
            result = self.add_adapter_output(result, x, name)
        return result

    def fused_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        """The base output and the adapter's term in one operation, or None to take the generic path
        (base output, then :meth:`add_adapter_output`). Methods override this where a fused form is
        cheaper, e.g. one GEMM with the per-step weight W + ΔW; the result must equal the generic path's."""
        return None

    def add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """Returns ``result`` plus the adapter's term (methods may fuse this)."""
        delta = self.adapter_output(x, adapter_name)
        return result + delta.to(result.dtype)

    def export_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The tensors of ``adapter_name`` under their saved names relative to this layer (``lora_A.weight``
        for a module, ``hada_w1_a`` for a plain parameter)."""
        out: dict[str, torch.Tensor] = {}
        for attr in self.adapter_param_names:
            container = getattr(self, attr)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Module):
                for key, value in item.state_dict().items():
                    out[f"{attr}.{key}"] = value
            else:
                out[attr] = item.detach()
        return out

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"


class LowRankLayer(AdapterLayer):
    """Base of the layers whose adapter tensors are plain parameters, one ``nn.ParameterDict`` per tensor
    name (LoHa, LoKr, AdaLoRA): creates the dicts, new parameters on the base's device and dtype, and the
    shared kaiming initialisation."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for name in (*self.adapter_param_names, *self.other_param_names):
            setattr(self, name, nn.ParameterDict())

    def _new_param(self, *shape: int, requires_grad: bool = True) -> nn.Parameter:
        """An uninitialised parameter of ``shape`` on the base weight's device, in the adapter dtype."""
        return nn.Parameter(torch.empty(*shape, **self._new_dtype_device()), requires_grad=requires_grad)

    def kaiming_init(self, adapter_name: str) -> None:
        """Kaiming-uniform (a=√5) for every adapter tensor of ``adapter_name``."""
        with torch.no_grad():
            for name in self.adapter_param_names:
                container = getattr(self, name)
                if adapter_name in container:
                    kaiming_uniform_(container[adapter_name])
