"""PEFT's status report of a model's adapters: :func:`get_layer_status` (one :class:`TunerLayerStatus` per adapter
layer and ``modules_to_save`` wrapper) and :func:`get_model_status` (one :class:`TunerModelStatus` that sums
them up). Where the layers disagree (some enabled, some not; different active adapters; an adapter merged in
some layers only; some tensors of an adapter trainable and others frozen) the summary says ``"irregular"``:
the model is in a state that was most likely not meant.

Both take a :class:`~deltatune.PeftModel`, a model whose adapters were injected with
:func:`~deltatune.inject_adapter_in_model`, or any module holding adapter layers; the same dataclasses and
values as PEFT (``peft.get_model_status``), which the tests check side by side.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .layers import AdapterLayer
from .modules_to_save import ModulesToSaveWrapper
from .tuner import AdapterModel

__all__ = ["TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status"]

Irregular = Literal["irregular"]
IRREGULAR: Irregular = "irregular"


@dataclass
class TunerLayerStatus:
    """The state of one adapter layer (or ``modules_to_save`` wrapper).

    Attributes:
        name: The module's path (``model.encoder.layer.0.attention.query``).
        module_type: PEFT's short type name (``lora.Linear``, ``ModulesToSaveWrapper``).
        enabled: Whether the layer's adapters are enabled.
        active_adapters: The adapters the layer is told to use.
        merged_adapters: The adapters folded into the base weight.
        requires_grad: Per adapter: True/False when all its tensors here agree, else ``"irregular"``.
        available_adapters: Every adapter the layer holds, sorted.
        devices: Per adapter: the device types its tensors are on, sorted (``["cpu"]``).
        quantization_backend: The quantised base's backend (always None: deltatune wraps no quantised layer).
    """

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    """The state of a model's adapters, summed up over its layers (``"irregular"`` where they disagree).

    Attributes:
        base_model_type: The user's model class (``"other"`` for a module that is no transformers model).
        adapter_model_type: PEFT's tuner class name (``LoraModel``), ``"None"`` without a ``PeftModel``.
        peft_types: Adapter name → its ``peft_type`` (``{"default": "LORA"}``).
        trainable_params: Parameters that require grad.
        total_params: All parameters.
        num_adapter_layers: Adapter layers and ``modules_to_save`` wrappers.
        enabled: Whether every layer is enabled, or ``"irregular"``.
        active_adapters: The layers' common active adapters, or ``"irregular"``.
        merged_adapters: The adapters merged in every layer that holds them, or ``"irregular"``.
        requires_grad: Per adapter: whether all its tensors require grad, or ``"irregular"``.
        available_adapters: Every adapter found in some layer, sorted.
        devices: Per adapter: the device types its tensors are on, sorted.
        quantization_backend: None, or ``"irregular"`` where layers differ.
    """

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | Irregular | None


def _is_peft_model(model: nn.Module) -> bool:
    """A :class:`~deltatune.PeftModel` (its ``base_model`` is the tuner; a transformers model's is its body)."""
    return isinstance(model.__dict__.get("_modules", {}).get("base_model"), AdapterModel)


def _agreement(values: Iterable[bool | Irregular]) -> bool | Irregular:
    """True when all are True, False when all are False, else ``"irregular"``."""
    seen = list(values)
    if all(v is True for v in seen):
        return True
    if all(v is False for v in seen):
        return False
    return IRREGULAR


def _containers(module: nn.Module, names: Iterable[str]) -> list[nn.ModuleDict | nn.ParameterDict]:
    found = [getattr(module, n, None) for n in names]
    return [c for c in found if isinstance(c, nn.ModuleDict | nn.ParameterDict)]


def _tensors_by_adapter(containers: list[nn.ModuleDict | nn.ParameterDict]) -> dict[str, list[torch.Tensor]]:
    """Adapter name → its tensors in ``containers`` (a key with no tensors, e.g. a dropout, maps to [])."""
    out: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    for container in containers:
        for key, item in container.items():
            out[key].extend(item.parameters() if isinstance(item, nn.Module) else [item])
    return out


def _status_modules(model: nn.Module) -> Iterable[tuple[str, AdapterLayer | ModulesToSaveWrapper]]:
    root = model.get_submodule("base_model") if _is_peft_model(model) else model
    for name, module in root.named_modules():
        if isinstance(module, AdapterLayer | ModulesToSaveWrapper):
            yield name, module


def _layer_status(name: str, module: AdapterLayer | ModulesToSaveWrapper) -> TunerLayerStatus:
    if isinstance(module, ModulesToSaveWrapper):
        trainable_names: tuple[str, ...] = ("modules_to_save",)
        other_names: tuple[str, ...] = ()
        merged: list[str] = []
    else:
        trainable_names, other_names = module.adapter_param_names, module.other_param_names
        merged = list(module.merged_adapters)
    trainable = _containers(module, trainable_names)
    tensors = _tensors_by_adapter(trainable)
    grads = {key: _agreement(p.requires_grad for p in ps) for key, ps in tensors.items() if ps}
    placed = _tensors_by_adapter(_containers(module, (*trainable_names, *other_names)))
    devices = {key: sorted({t.device.type for t in ts}) for key, ts in placed.items()}
    return TunerLayerStatus(
        name=name,
        module_type=repr(module).partition("(")[0],
        enabled=not module.disable_adapters,
        active_adapters=list(module.active_adapters),
        merged_adapters=merged,
        requires_grad=grads,
        available_adapters=sorted({key for c in trainable for key in c}),
        devices=devices,
        quantization_backend=None,
    )


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of every adapter layer and ``modules_to_save`` wrapper of ``model``, in module order.

    Raises:
        ValueError: when ``model`` holds no adapter layer (PEFT's error).
    """
    found = [_layer_status(name, module) for name, module in _status_modules(model)]
    if not found:
        raise ValueError(
            "No adapter layers found in the model, please ensure that it's a PEFT model or that you have PEFT "
            "adapters injected in the model."
        )
    return found


def _parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters, each shared tensor once (as ``PeftModel.get_nb_trainable_parameters``)."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def _model_types(model: nn.Module) -> tuple[str, str, dict[str, str], tuple[int, int]]:
    """(base model type, adapter model type, peft types, parameter counts), as PEFT names them."""
    if _is_peft_model(model):
        peft_model: Any = model
        tuner: AdapterModel = peft_model.base_model
        configs = tuner.peft_config
        adapter_type = type(tuner).__name__
        if (
            type(tuner) is AdapterModel and configs
        ):  # a method without a tuner class: PEFT's name for its tuner
            adapter_type = type(next(iter(configs.values()))).__name__.removesuffix("Config") + "Model"
        types = {name: str(config.peft_type).rpartition(".")[2] for name, config in configs.items()}
        return type(tuner.model).__name__, adapter_type, types, peft_model.get_nb_trainable_parameters()
    from transformers import PreTrainedModel

    base_type = type(model).__name__ if isinstance(model, PreTrainedModel) else "other"
    return base_type, "None", {}, _parameter_counts(model)


def _merged_everywhere(layers: list[TunerLayerStatus]) -> list[str] | Irregular:
    """The adapters merged in some layer, or ``"irregular"`` when one of them is held unmerged elsewhere."""
    merged = set().union(*(s.merged_adapters for s in layers))
    for s in layers:
        if (set(s.available_adapters) - set(s.merged_adapters)) & merged:
            return IRREGULAR
    return sorted(merged)


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The status of ``model``'s adapters, summed up over :func:`get_layer_status` (see :class:`TunerModelStatus`).

    Raises:
        ValueError: when ``model`` holds no adapter layer (PEFT's error).
    """
    base_type, adapter_type, peft_types, (trainable, total) = _model_types(model)
    layers = get_layer_status(model)
    enabled = {s.enabled for s in layers}
    active = {tuple(s.active_adapters) for s in layers}
    grads: dict[str, list[bool | Irregular]] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for s in layers:
        for key, value in s.requires_grad.items():
            grads[key].append(value)
        for key, types in s.devices.items():
            devices[key].update(types)
    backends = {s.quantization_backend for s in layers}
    return TunerModelStatus(
        base_model_type=base_type,
        adapter_model_type=adapter_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else IRREGULAR,
        active_adapters=list(active.pop()) if len(active) == 1 else IRREGULAR,
        merged_adapters=_merged_everywhere(layers),
        requires_grad={key: _agreement(values) for key, values in grads.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={key: sorted(types) for key, types in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else IRREGULAR,
    )
