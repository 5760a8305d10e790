"""LoRA on ``nn.Parameter``s (``LoraConfig(target_parameters=[...])``, PEFT's ``ParamWrapper``): for weights
that no ``nn.Linear`` holds, such as the stacked expert weights of mixture-of-experts layers.

A 2-D parameter (out, in) gets ΔW = s·B A, as a Linear does. A 3-D parameter of E experts, read as
(E, out, in), or as (E, in, out) when its module sets ``is_transposed = True`` (PEFT's reading), gets one
rank-r pair per expert, kept in one
``lora_A`` Linear(in, r·E) and one ``lora_B`` Linear(r·E, out): expert e uses rows e·r…(e+1)·r of A and
columns e, E+e, 2E+e, … of B (PEFT's layout, so files cross-load). Forward runs the holding module with the
parameter replaced by W + ΔW for the call (the stored parameter is untouched); merging adds ΔW to it.

Each layer adapts one parameter; several parameters of one module nest (the first one innermost, as
PEFT nests them), so the saved keys are PEFT's: ``…experts.lora_A.weight`` (the last parameter),
``…experts.base_layer.lora_A.weight`` (the one before). PEFT's refusals: dropout, ``fan_in_fan_out``,
``lora_bias``, DoRA, mixed adapter batches; only 2-D and 3-D parameters.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from ..layers import AdapterLayer
from ..modules_to_save import AdapterLayerHolder, ModulesToSaveWrapper
from ..tuner import AdapterModel
from ._lora_layer import LoraLayer, lora_scaling
from ._lora_variants import VariantTable

__all__ = ["LoraParamLayer", "inject_parameters"]


def _innermost(module: nn.Module) -> nn.Module:
    """The module holding the parameters (``base_layer`` of an adapter layer is the adapted module under any
    nested layers; ``next_layer`` is the nested layer that forward calls)."""
    return module.base_layer if isinstance(module, LoraParamLayer) else module


class LoraParamLayer(LoraLayer):
    """LoRA on the parameter ``parameter_name`` of ``base_layer`` (a module, or another such layer)."""

    supported_layers: ClassVar[tuple[type[nn.Module], ...]] = (nn.Module,)

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        self.parameter_name = parameter_name
        super().__init__(base_layer)

    def _in_out_features(self, base_layer: nn.Module) -> tuple[int, int]:
        """From the parameter's shape: (out, in), or (E, in, out) with in and out swapped unless the module's
        ``is_transposed`` says (E, in, out) is its real layout (PEFT's reading).

        Raises:
            ValueError: for a parameter that is neither 2-D nor 3-D.
        """
        param = getattr(_innermost(base_layer), self.parameter_name)
        shape = tuple(param.shape)
        if len(shape) == 2:
            self.num_experts, self.swapped = 1, False
            return int(shape[1]), int(shape[0])
        if len(shape) != 3:
            raise ValueError(
                f"lora.ParamWrapper was initialized with {len(shape)} dimensional Parameter, but only 2d and 3d "
                "are supported."
            )
        self.num_experts = int(shape[0])
        self.swapped = not getattr(_innermost(base_layer), "is_transposed", False)
        return (int(shape[2]), int(shape[1])) if self.swapped else (int(shape[1]), int(shape[2]))

    @property
    def holder(self) -> nn.Module:
        """The module that holds the parameter."""
        return _innermost(self.base_layer)

    @property
    def base_weight(self) -> torch.Tensor:
        """The adapted parameter."""
        return self.holder._parameters[self.parameter_name]  # type: ignore[return-value]

    @property
    def base_bias(self) -> torch.Tensor | None:
        return None

    def _new_dtype_device(self) -> dict[str, Any]:
        weight = self.base_weight
        half = weight.dtype in (torch.float16, torch.bfloat16)
        return {"dtype": torch.float32 if half else weight.dtype, "device": weight.device}

    def _get_name(self) -> str:
        return "lora.ParamWrapper"

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, " + super().extra_repr()

    @property
    def lora_variants(self) -> VariantTable:
        """Plain LoRA only."""
        return {(): None}

    def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> Any:
        """As every LoRA kind's, after PEFT's refusals of the options this layer cannot honour (DoRA among them)."""
        self._refuse_options(config)
        return super().resolve_lora_variant(config=config, **kwargs)

    def update_layer(self, adapter_name: str, config: Any, r: int, alpha: float) -> None:
        """A (in → r·E) and B (r·E → out) Linears, initialised as a Linear's LoRA.

        Raises:
            ValueError: with PEFT's options this layer cannot honour (dropout, fan_in_fan_out, lora_bias, DoRA).
        """
        self._refuse_options(config)
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        kw = self._new_dtype_device()
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r * self.num_experts, bias=False, **kw)
        self.lora_B[adapter_name] = nn.Linear(r * self.num_experts, self.out_features, bias=False, **kw)
        self.lora_dropout[adapter_name] = nn.Identity()
        self.r[adapter_name] = r
        self.scaling[adapter_name] = lora_scaling(alpha, r, config.use_rslora)
        self.reset_parameters(adapter_name, config.init_lora_weights, config.loftq_config)
        self._finish_update(adapter_name)

    def _refuse_options(self, config: Any) -> None:
        """PEFT's refusals: no dropout, ``fan_in_fan_out``, ``lora_bias`` or DoRA on a parameter.

        Raises:
            ValueError: naming the option.
        """
        name = type(self).__name__
        refused = {
            "lora_dropout != 0": config.lora_dropout,
            "fan_in_fan_out": config.fan_in_fan_out,
            "lora_bias=True": config.lora_bias,
            "use_dora=True": config.use_dora,
        }
        for what, value in refused.items():
            if value:
                raise ValueError(f"lora.ParamWrapper ({name}) does not work with {what}.")

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW in the parameter's shape and dtype."""
        a, b = self.factor_weights(adapter_name)
        scale = self.scaling[adapter_name]
        if self.base_weight.dim() == 2:
            delta = (b @ a) * scale
        else:
            a3 = a.reshape(self.num_experts, -1, a.shape[-1])  # (E, r, in)
            b3 = b.reshape(b.shape[0], -1, self.num_experts)  # (out, r, E)
            spec = "o r e, e r i -> e o i" if self.swapped else "o r e, e r i -> e i o"
            delta = torch.einsum(spec, b3, a3) * scale
        return delta.to(self.base_weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.batch_adapter_names is not None:
            raise ValueError("lora.ParamWrapper does not support mixed batch inference")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.next_layer(x, *args, **kwargs)
        names = [n for n in self.active_adapters if n in self._held]
        if self.merged or not names:
            return self.next_layer(x, *args, **kwargs)
        weight = self.base_weight
        delta = self.delta_weight(names[0])
        for name in names[1:]:
            delta = delta + self.delta_weight(name)
        holder = self.holder
        # An instance attribute shadows the registered parameter for this call (the parameter stays in place).
        holder.__dict__[self.parameter_name] = weight + delta
        try:
            return self.next_layer(x, *args, **kwargs)
        finally:
            holder.__dict__.pop(self.parameter_name, None)

    def fused_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        return None


def _strip_base_layer(name: str) -> str:
    parts = [p for p in name.split(".") if p != "base_layer"]
    return ".".join(parts)


def _matches(key: str, targets: list[str]) -> bool:
    return key in targets or any(key.endswith(f".{t}") for t in targets)


def inject_parameters(tuner: AdapterModel, adapter_name: str, config: Any) -> list[str]:
    """Wraps every parameter ``config.target_parameters`` names (an exact name, or a name ending with
    ``.<entry>``) in a :class:`LoraParamLayer` for ``adapter_name`` (a parameter already wrapped for another
    adapter gets this one added); returns the matched names.

    Raises:
        ValueError: for a parameter of the top-level module, or of a module another adapter layer holds.
    """
    targets = sorted(set(config.target_parameters or ()))
    model = tuner.model
    found: list[tuple[str, str]] = []
    for module_name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper | AdapterLayerHolder):
            continue
        for param_name, _ in module.named_parameters(recurse=False):
            key = f"{_strip_base_layer(module_name)}.{param_name}".lstrip(".")
            if _matches(key, targets):
                found.append((_strip_base_layer(module_name), param_name))
    matched: list[str] = []
    for module_name, param_name in found:
        if not module_name:
            raise ValueError(
                f"Targeting an nn.Parameter on the top-level module is not supported (parameter '{param_name}'). "
            )
        current = model.get_submodule(module_name)
        if isinstance(current, AdapterLayer) and not isinstance(current, LoraParamLayer):
            base = getattr(current, "base_layer", current)  # PEFT names the wrapped layer's type
            raise ValueError(
                f"Trying to wrap an `nn.Parameter` of layer '{module_name}' of type {type(base).__name__}, which "
                "is not a valid target. Make sure that this layer is not also targeted with `target_modules`."
            )
        key = f"{module_name}.{param_name}"
        target = config.target_spec(key, [key])
        existing = current
        while isinstance(existing, LoraParamLayer) and existing.parameter_name != param_name:
            existing = existing.next_layer
        if isinstance(existing, LoraParamLayer):
            if not existing.holds(adapter_name):
                existing.add_adapter(adapter_name, target)
                _freeze_if_inactive(tuner, existing, adapter_name)
        else:
            layer = LoraParamLayer(current, param_name)
            layer.add_adapter(adapter_name, target)
            _freeze_if_inactive(tuner, layer, adapter_name)
            model.set_submodule(module_name, layer)
        matched.append(key)
    if targets and not matched:
        warnings.warn(
            f"target_parameters={list(config.target_parameters)} were set but no parameter was matched.",
            RuntimeWarning,
            stacklevel=5,
        )
    return matched


def _freeze_if_inactive(tuner: AdapterModel, layer: LoraParamLayer, adapter_name: str) -> None:
    """A later adapter stays inactive and frozen (PEFT)."""
    if adapter_name not in tuner.active_adapters:
        layer.active_adapters = list(tuner.active_adapters)
        for p in layer.adapter_parameters(adapter_name):
            p.requires_grad_(False)
