"""The adapter layer: wraps a frozen ``base_layer`` and applies the active adapters.

Shared by every method: forward dispatch (disabled / merged / unmerged), merge and unmerge, safe
merge, adapter bookkeeping (several named adapters, explicitly tracked; active set, deletion) and
trainability. A method's layer subclass creates its parameters from the module's
:class:`~deltatune.config.TargetSpec` (:meth:`AdapterLayer.add_adapter`) and picks its forward hooks:

- :meth:`AdapterLayer.transform_input`: change the input before the base op (IA³ on a feed-forward
  module scales it); used when the class sets ``transforms_input``;
- :meth:`AdapterLayer.transform_output`: change the base output (default: add :meth:`adapter_output`,
  the additive low-rank term; IA³ scales it);
- :meth:`AdapterLayer.merged_weight` / :meth:`AdapterLayer.unmerged_weight`: the weight transform that
  merging applies (default W ± ΔW; DoRA rescales columns, IA³ scales rows or columns).

:class:`RankedLayer` adds what the low-rank methods share: ``r`` and ``scaling`` per adapter and
``update_layer(name, config, r, alpha)``, called with the rank and alpha resolved for the module.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ._layer_helpers import (
    BaseLayerSlot,
    adapter_dtype,
    base_weight_shape,
    expect_config,
    kaiming_uniform_,
    module_bias,
    module_weight,
    overwrite_,
)
from .config import TargetSpec
from .layer_types import apply_with_weight, in_out_features, is_linear_like
from .mixed_batch import MixedBatchMixin

__all__ = [
    "AdapterLayer",
    "LowRankLayer",
    "RankedLayer",
    "adapter_dtype",
    "base_weight_shape",
    "expect_config",
    "kaiming_uniform_",
    "module_bias",
    "module_weight",
]


class AdapterLayer(MixedBatchMixin, BaseLayerSlot):
    """Base class of the layers that wrap a targeted module.

    Args:
        base_layer: The module being adapted (``nn.Linear`` or ``nn.Conv2d``); kept frozen as a child.

    Attributes:
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
    #: Whether forward runs :meth:`transform_input` (False keeps the hot path free of the call).
    transforms_input: ClassVar[bool] = False
    #: Whether unmerging restores W up to rounding at W's scale (an additive ΔW); False for a method that
    #: divides a merged factor out again, which loses more where the factor is small (IA³, as in PEFT).
    exact_unmerge: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer  # in a mixed model: another adapter layer (see BaseLayerSlot)
        if not isinstance(self.base_layer, self.supported_layers):
            names, kind = ", ".join(t.__name__ for t in self.supported_layers), type(self.base_layer).__name__
            raise TypeError(f"{type(self).__name__} cannot adapt a {kind}; supported layer types: {names}")
        #: PEFT's names for the adapted sizes (see :func:`deltatune.layer_types.in_out_features`).
        self.in_features, self.out_features = self._in_out_features(self.base_layer)
        #: During ``PeftModel.forward(adapter_names=[...])``: the adapter of each row of the batch.
        self.batch_adapter_names: list[str] | None = None
        #: The adapters this layer holds, in creation order (a dict used as an ordered set).
        self._held: dict[str, None] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        #: Further per-adapter dicts of a method (name → {adapter → value}), cleaned on deletion.
        self._extra_per_adapter: dict[str, dict[str, Any]] = {}

    def _in_out_features(self, base_layer: nn.Module) -> tuple[int, int]:
        return in_out_features(base_layer)  # a layer adapting a parameter reads its shape instead

    # ---- to be provided by each method ------------------------------------------------------
    def add_adapter(self, adapter_name: str, target: TargetSpec) -> None:
        """Creates the tensors of ``adapter_name`` for this module as ``target`` describes it (the config, the
        module's name and its resolved per-module options), then :meth:`_finish_update`."""
        raise NotImplementedError

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW of ``adapter_name``, scaling included, with the base weight's shape (computed in fp32 or the
        adapter dtype)."""
        raise NotImplementedError

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The additive term of ``adapter_name`` for input ``x``: equals ``base_op(x, ΔW)`` (no bias)."""
        raise NotImplementedError

    def transform_input(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The input the base op sees with ``adapter_name`` active (identity; called only when the class sets
        :attr:`transforms_input`)."""
        return x

    def transform_output(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The layer's output with ``adapter_name`` applied to the base output ``result`` (``x``: the layer's
        input); default: :meth:`add_adapter_output`, the additive term."""
        return self.add_adapter_output(result, x, adapter_name)

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
        """Every adapter this layer holds, in creation order."""
        return list(self._held)

    def holds(self, adapter_name: str) -> bool:
        """Whether this layer holds ``adapter_name``."""
        return adapter_name in self._held

    def _adapter_containers(self) -> list[nn.ModuleDict | nn.ParameterDict]:
        return [getattr(self, n) for n in (*self.adapter_param_names, *self.other_param_names)]

    def _new_dtype_device(self) -> dict[str, Any]:
        return {"dtype": adapter_dtype(self.base_layer), "device": self.base_weight.device}

    def _finish_update(self, adapter_name: str) -> None:
        """Records a freshly created adapter as held and makes it active (its tensors were created on the
        base's device)."""
        self._held[adapter_name] = None
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
        self._held.pop(adapter_name, None)
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
            if name not in self._held or name in self.merged_adapters:
                continue
            with torch.no_grad():
                merged = self.merged_weight(name, weight.data)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(
                        f"merging adapter {name!r} would put NaN/inf into the base weight; the weight was "
                        "left unchanged"
                    )
                overwrite_(weight, merged)
                self._merge_bias(name, sign=1.0)
            self.merged_adapters.append(name)

    def _warn_if_merged(self, names: list[str]) -> None:
        """PEFT's warnings when merging into a layer that already holds merged adapters."""
        if not self.merged:
            return
        pending = [n for n in names if n in self._held and n not in self.merged_adapters]
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
                overwrite_(weight, self.unmerged_weight(name, weight.data))
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
        below = self.next_layer  # the base layer, or in a mixed model the nested adapter layers over it
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return below(x, *args, **kwargs)
        if self.merged:
            return below(x, *args, **kwargs)
        names = [name for name in self.active_adapters if name in self._held]
        if len(names) == 1 and not args and not kwargs and below is self.base_layer:
            fused = self.fused_forward(x, names[0])
            if fused is not None:
                return fused
        base_input = x
        if self.transforms_input:
            for name in names:
                base_input = self.transform_input(base_input, name)
        result = below(base_input, *args, **kwargs)
        for name in names:
            result = self.transform_output(result, x, name)
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


class RankedLayer(AdapterLayer):
    """Base of the low-rank methods' layers: a rank and a scale per adapter, and ``update_layer`` called with
    the module's rank and alpha (from the config's patterns, see :meth:`deltatune.config.LowRankMixin`).

    Attributes:
        r: Rank per adapter name.
        scaling: Scale per adapter name (never serialized).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self._extra_per_adapter.update(r=self.r, scaling=self.scaling)

    def add_adapter(self, adapter_name: str, target: TargetSpec) -> None:
        """``update_layer`` with the rank and alpha resolved for this module."""
        self.update_layer(
            adapter_name, target.config, int(target.options["r"]), float(target.options["alpha"])
        )

    def update_layer(self, adapter_name: str, config: Any, r: int, alpha: float) -> None:
        """Creates the tensors of ``adapter_name`` with rank ``r`` and scale numerator ``alpha``."""
        raise NotImplementedError


class LowRankLayer(RankedLayer):
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
