"""The adapter layer: wraps a frozen ``base_layer`` and adds the active adapters' deltas.

Shared by every method: forward dispatch (disabled / merged / unmerged), merge and unmerge, safe
merge, adapter bookkeeping (several named adapters, active set, deletion) and trainability. A method's
layer subclass only creates its parameters (:meth:`AdapterLayer.update_layer`), builds its ΔW
(:meth:`AdapterLayer.delta_weight`) and computes its additive output (:meth:`AdapterLayer.adapter_output`).
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ._layer_helpers import (
    adapter_dtype,
    base_weight_shape,
    expect_config,
    kaiming_uniform_,
    module_bias,
    module_weight,
)
from .config import AdapterConfig
from .layer_registry import LayerKinds
from .layer_types import apply_with_weight, in_out_features, is_linear_like
from .mixed_batch import MixedBatchMixin

__all__ = [
    "AdapterLayer",
    "LowRankLayer",
    "adapter_dtype",
    "base_weight_shape",
    "expect_config",
    "kaiming_uniform_",
    "module_bias",
    "module_weight",
]


class AdapterLayer(LayerKinds, MixedBatchMixin, nn.Module):
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
    #: The method's short name in ``repr`` (``"lora"`` gives ``lora.Linear(...)``, as in PEFT).
    repr_prefix: ClassVar[str] = ""
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
        #: PEFT's names for the adapted sizes (see :func:`deltatune.layer_types.in_out_features`).
        self.in_features, self.out_features = in_out_features(base_layer)
        #: During ``PeftModel.forward(adapter_names=[...])``: the adapter of each row of the batch.
        self.batch_adapter_names: list[str] | None = None
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
    def mergeable(self) -> bool:
        """Whether the adapters can be folded into the base weight (not so for LoRA on a grouped conv)."""
        return True

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

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Activates ``adapter_names`` (only those held here) and makes exactly their tensors trainable (none
        with ``inference_mode``)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in self.adapter_names:
            for p in self.adapter_parameters(name):
                p.requires_grad_(name in names and not inference_mode)
        self.active_adapters = (
            names  # as in PEFT, names this layer does not hold stay listed (and are skipped)
        )

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Turns gradients of the named adapters' tensors on or off (active or not)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            for p in self.adapter_parameters(name):
                p.requires_grad_(requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        """Enables or disables this layer's adapters; disabled, its adapter tensors are frozen as in PEFT (and
        forward gives the base output)."""
        if not enabled:
            for name in self.adapter_names:
                for p in self.adapter_parameters(name):
                    p.requires_grad_(False)
        self.disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes ``adapter_name`` (unmerging it first if merged)."""
        if adapter_name in self.merged_adapters:
            self.unmerge()
        self._delete_tensors(adapter_name)
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    def _delete_tensors(self, adapter_name: str) -> None:
        for container in self._adapter_containers():
            if adapter_name in container:
                del container[adapter_name]
        self.r.pop(adapter_name, None)
        self.scaling.pop(adapter_name, None)
        for per_adapter in self._extra_per_adapter.values():
            per_adapter.pop(adapter_name, None)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Folds the adapters into the base weight (W ← :meth:`merged_weight`, W + ΔW by default).

        Args:
            safe_merge: Check the merged weight for NaN/inf first and raise ``ValueError`` (W untouched).
            adapter_names: Adapters to merge; default the active ones. Already merged ones are skipped.
        """
        names = self.active_adapters if adapter_names is None else adapter_names
        if isinstance(names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {names!r}")
        self._warn_if_merged(names)
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

    def _warn_if_merged(self, names: list[str]) -> None:
        """PEFT's warnings when merging into a layer that already holds merged adapters."""
        if not self.merged:
            return
        pending = [n for n in names if n in self.r and n not in self.merged_adapters]
        if pending:
            warnings.warn(
                f"Already following adapters were merged {','.join(self.merged_adapters)}. "
                f"You are now additionally merging {','.join(pending)}.",
                stacklevel=4,
            )
        else:
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=4)

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
        """Undoes every merge in reverse order (W ← :meth:`unmerged_weight`); warns, as PEFT does, when
        nothing is merged."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.base_weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                weight.data.copy_(self.unmerged_weight(name, weight.data))
                self._merge_bias(name, sign=-1.0)

    def base_forward_with_weight(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Applies the base layer's operation with ``weight`` (in the base's stored layout) instead of its own
        (and ``bias``, default none); see :func:`deltatune.layer_types.apply_with_weight`."""
        base = self.base_layer
        if isinstance(base, nn.Linear):
            return F.linear(x, weight, bias)
        return apply_with_weight(base, x, weight, bias)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.batch_adapter_names is not None:
            # A mixed batch (PeftModel.forward(adapter_names=...)): a separate path, so the fast paths below
            # never see it.
            return self.mixed_batch_forward(x, self.batch_adapter_names, *args, **kwargs)
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

    def cast_adapter(self, adapter_name: str, dtype: torch.dtype) -> None:
        """Casts the tensors of ``adapter_name`` to ``dtype`` (``autocast_adapter_dtype=False``: the base's)."""
        if not dtype.is_floating_point:
            return
        for container in self._adapter_containers():
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Module):
                item.to(dtype)
            else:
                item.data = item.data.to(dtype)

    def adapter_to_meta(self, adapter_name: str) -> None:
        """Replaces the trainable tensors of ``adapter_name`` by storage-free ``meta`` tensors
        (``low_cpu_mem_usage``: they are materialised by the loaded weights)."""
        for attr in self.adapter_param_names:
            container = getattr(self, attr)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Module):
                item.to_empty(device="meta")
            else:
                container[adapter_name] = nn.Parameter(
                    torch.empty_like(item, device="meta"), requires_grad=item.requires_grad
                )

    def _get_name(self) -> str:
        """The name in ``repr``: PEFT's ``<method>.<layer kind>`` (``lora.Linear``) when the method sets
        :attr:`repr_prefix`, else the class name."""
        if not self.repr_prefix:
            return type(self).__name__
        kind = "Linear" if is_linear_like(self.base_layer) else type(self.base_layer).__name__
        return f"{self.repr_prefix}.{kind}"

    def unwrapped(self) -> nn.Module:
        """The module to put back when the adapter layer is removed (the base layer)."""
        return self.base_layer

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
