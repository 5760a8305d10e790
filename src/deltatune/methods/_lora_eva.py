"""EVA (Paischer et al., 2024, "One Initialization to Rule them All: Fine-tuning via Explained Variance
Adaptation"): ``init_lora_weights="eva"`` with PEFT's :func:`get_eva_state_dict` and
:func:`initialize_lora_eva_weights`.

Each targeted Linear/``Conv1D`` gets A = the top right singular vectors of its inputs over the data (optionally
whitened: divided by √S), B = 0, so the model's output is unchanged. The inputs are collected by forward hooks
while the dataloader is cycled, each batch folding into a streaming SVD (:mod:`._lora_eva_svd`) with up to
r·rho components, until every component a layer needs has converged. The ranks are redistributed: the total
budget (the sum of the layers' ranks) goes to the components with the largest explained-variance ratio across
layers, so a layer ends with 0 to r·rho components (0: the adapter is removed there). Layers fed the same input
(q/k/v projections) share one SVD. With ``adjust_scaling_factors``, a layer's alpha scales with new rank / r.

The new ranks, alphas and targets are written into the config (``rank_pattern``, ``alpha_pattern``,
``target_modules``), as PEFT does, so a saved adapter loads in either library.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from itertools import cycle
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..layer_types import Conv1D
from ..layers import AdapterLayer, module_weight
from ._lora_corda import data_init_targets
from ._lora_eva_svd import (
    EvaHook,
    LayerInputsFn,
    forward_fn_dict,
    model_device,
    prepare_layer_inputs_fn_language_modeling,
    prepare_model_inputs_fn_language_modeling,
    to_device,
)

__all__ = [
    "forward_fn_dict",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "minimal_suffixes",
]

logger = logging.getLogger(__name__)
PREFIX = "base_model.model."
#: PEFT condenses the targets EVA leaves into name suffixes from this many on.
MIN_TARGETS_TO_CONDENSE = 20
_LayerFns = LayerInputsFn | Mapping[str, LayerInputsFn | None] | None


def _is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable[Any],
    peft_config: Any = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable[[Any, Any], Any] | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: _LayerFns = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """EVA's A per layer (layer name → (new rank, in_features)), from the layers' inputs over ``dataloader``
    (PEFT's function and arguments).

    Args:
        model: A deltatune ``PeftModel`` (its LoRA layers on Linear/``Conv1D`` are used, adapters disabled) or a
            plain model (its Linear/``Conv1D`` layers that ``peft_config`` targets).
        dataloader: Batches, cycled until the components converge (a ``len()`` is needed).
        peft_config: The ``LoraConfig``; only needed for a plain model.
        forward_fn: Runs the model on a batch: ``forward_fn(model, batch)`` (default ``model(**batch)``).
        prepare_model_inputs_fn: ``fn(batch, peft_config)`` → what the layer function receives as
            ``model_input`` (default: the token indices kept by the attention and label masks); None passes a
            copy of the batch.
        prepare_layer_inputs_fn: ``fn(layer_input, model_input, layer_name)`` → the 2-D rows used, or a mapping
            layer name → such a function (None: the input with all but the last dimension flattened).
        adapter_name: The adapter whose config is used on a ``PeftModel``.
        gather_distributed_inputs: Under ``torch.distributed``, whether every process's rows are gathered.
        show_progress_bar: Whether to show progress.

    Raises:
        ValueError: for an empty dataloader, a plain model without ``peft_config``, or names in a
            ``prepare_layer_inputs_fn`` mapping that are no target.
    """
    wrapped: Any = model
    targets: list[tuple[str, nn.Module]]
    if _is_peft_model(model):
        config = wrapped.peft_config[adapter_name] if peft_config is None else peft_config
        context: Any = wrapped.disable_adapter()
        targets = [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, AdapterLayer) and isinstance(m.base_layer, nn.Linear | Conv1D)
        ]
    elif peft_config is None:
        raise ValueError("peft_config is required if model is not a PeftModel")
    else:
        config, context, targets = peft_config, nullcontext(), list(data_init_targets(model, peft_config))
    if getattr(config, "eva_config", None) is None:
        raise ValueError("EVA needs peft_config.eva_config (an EvaConfig); set init_lora_weights='eva'")
    with context:
        return _collect(
            model, dataloader, config, targets, forward_fn or forward_fn_dict, prepare_model_inputs_fn,
            prepare_layer_inputs_fn, gather_distributed_inputs, show_progress_bar,
        )  # fmt: skip


def _collect(
    model: nn.Module,
    dataloader: Iterable[Any],
    config: Any,
    targets: list[tuple[str, nn.Module]],
    forward_fn: Callable[[nn.Module, Any], Any],
    prepare_model_inputs_fn: Callable[[Any, Any], Any] | None,
    prepare_layer_inputs_fn: _LayerFns,
    gather: bool,
    show_progress_bar: bool,
) -> dict[str, torch.Tensor]:
    if len(dataloader) == 0:  # type: ignore[arg-type]
        raise ValueError("dataloader is empty")
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and gather:
        warnings.warn(
            "torch.distributed is initialized and `gather_distributed_inputs` is True, therefore EVA "
            "initialization will gather tensors from all ranks. Ensure the model does not receive the same "
            "inputs on different ranks.",
            stacklevel=4,
        )
    options = config.eva_config
    rho = options.rho
    if rho > 1000:  # PEFT's cap for very large rho
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // config.r)
    training = model.training
    device = model_device(model)
    model.eval()

    def model_input(batch: Any) -> Any:
        if prepare_model_inputs_fn is None:
            return copy.deepcopy(batch)
        return prepare_model_inputs_fn(batch, config)

    layer_fns = dict(prepare_layer_inputs_fn) if isinstance(prepare_layer_inputs_fn, Mapping) else None
    hooks: dict[str, EvaHook] = {}
    handles: dict[str, Any] = {}
    max_components: dict[str, int] = {}
    budget = 0
    first = to_device(next(iter(dataloader)), device)
    first_input = model_input(first)
    for name, module in targets:
        fn = layer_fns.pop(name, None) if layer_fns is not None else prepare_layer_inputs_fn
        hooks[name] = EvaHook(name, fn, gather)  # type: ignore[arg-type]
        hooks[name].model_input = first_input
        handles[name] = module.register_forward_hook(hooks[name])
        rank = int(config.module_options([name])["r"])
        max_components[name] = round(rank * rho)
        budget += rank
    if layer_fns:
        for handle in handles.values():
            handle.remove()
        raise ValueError(
            "prepare_layer_inputs_fn is a mapping but the following module names were not found in the model: "
            f"{list(layer_fns)}"
        )
    try:
        forward_fn(model, first)
    finally:
        for handle in handles.values():
            handle.remove()
    unused = [name for name, hook in hooks.items() if not hook.fingerprints]
    if unused:
        raise ValueError(
            f"EVA: forward_fn never ran the targeted layers {unused[:5]}; leave them out of target_modules"
        )
    # Layers fed the same input share the SVD of the first of them, with the largest component count.
    groups: dict[str, list[str]] = {}
    for name, hook in hooks.items():
        groups.setdefault(hook.fingerprints[0], []).append(name)
    shared = {other: names[0] for names in groups.values() for other in names[1:]}
    for names in groups.values():
        largest = max(max_components[n] for n in names)
        for n in names:
            max_components[n] = largest
    modules = dict(targets)
    svd_hooks = {name: hook for name, hook in hooks.items() if name not in shared}
    for name, hook in svd_hooks.items():
        hook.start_svd(max_components[name], options.tau)
        handles[name] = modules[name].register_forward_hook(hook)
    layer_to_hook = {**{n: n for n in svd_hooks}, **shared}
    ranks = dict(max_components)
    done = dict.fromkeys(svd_hooks, False)
    show = show_progress_bar and (not distributed or dist.get_rank() == 0)
    batches = tqdm(cycle(dataloader), position=0, leave=False, disable=not show)
    try:
        for step, raw in enumerate(batches):
            starved = [n for n, h in svd_hooks.items() if h.svd is not None and h.svd.components is None]
            if step >= len(dataloader) and starved:  # type: ignore[arg-type]  # PEFT would cycle forever
                raise ValueError(
                    f"EVA: no batch gave {starved[0]} at least {max_components[starved[0]]} rows (r * rho); use "
                    "larger batches or a smaller rho"
                )
            batch = to_device(raw, device)
            inputs = model_input(batch)
            for name, hook in svd_hooks.items():
                converged = bool(torch.all(hook.converged[: ranks[name]]))
                if not done[name] and converged:
                    handles.pop(name).remove()
                    done[name] = True
                    continue
                if done[name] and not converged:  # the redistribution now asks more of this layer
                    handles[name] = modules[name].register_forward_hook(hook)
                    done[name] = False
                hook.model_input = inputs
            batches.set_description(f"{sum(done.values())}/{len(done)} layers have converged")
            if all(done.values()):
                break
            forward_fn(model, batch)
            if all(h.svd is not None and h.svd.components is not None for h in svd_hooks.values()):
                ranks = _redistribute(svd_hooks, layer_to_hook, shared, budget, max_components)
    finally:
        for handle in handles.values():
            handle.remove()
        model.train(training)
    return _components(svd_hooks, layer_to_hook, ranks, options.whiten, device)


def _redistribute(
    hooks: dict[str, EvaHook],
    layer_to_hook: dict[str, str],
    shared: dict[str, str],
    budget: int,
    max_components: dict[str, int],
) -> dict[str, int]:
    """Layer → rank: the ``budget`` components with the largest explained-variance ratios over all layers
    (a layer sharing another's SVD counts its components again); within a group of layers fed the same
    input, the one holding the SVD gets the largest count."""
    owners: list[str] = []
    values: list[torch.Tensor] = []
    for layer, hook_name in layer_to_hook.items():
        svd = hooks[hook_name].svd
        assert svd is not None
        ratios = svd.explained_variance_ratio[: max_components[layer]]
        owners.extend([layer] * ratios.shape[0])
        values.extend(ratios.unbind())
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(owners[i] for i in order[:budget].tolist())
    ranks = {layer: counts.get(layer, 0) for layer in layer_to_hook}
    for layer, owner in shared.items():
        if ranks[owner] < ranks[layer]:
            ranks[owner], ranks[layer] = ranks[layer], ranks[owner]
    return ranks


def _components(
    hooks: dict[str, EvaHook],
    layer_to_hook: dict[str, str],
    ranks: dict[str, int],
    whiten: bool,
    device: torch.device | None,
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for layer, rank in ranks.items():
        hook = hooks[layer_to_hook[layer]]
        assert hook.svd is not None and hook.svd.components is not None
        if not bool(torch.all(hook.converged[:rank])):
            raise ValueError(
                f"EVA: layer {layer} was assigned rank {rank} but its components have not converged"
            )
        a = hook.svd.components[:rank].clone()
        if whiten:
            a = a / hook.svd.singular_values[:rank].sqrt().reshape(-1, 1)
        out[layer] = a if device is None else a.to(device)
    return out


@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Iterable[Any] | None = None,
    eva_state_dict: dict[str, torch.Tensor] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable[[Any, Any], Any] | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: _LayerFns = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> nn.Module:
    """Initialises the EVA adapter ``adapter_name`` of a ``PeftModel`` from ``dataloader`` (through
    :func:`get_eva_state_dict`, same arguments) or from a given ``eva_state_dict``; layers get their new ranks,
    a layer of rank 0 loses its adapter, layers without components get the default initialisation (with a
    warning), and the config's ``target_modules``, ``rank_pattern`` and ``alpha_pattern`` are updated.

    Raises:
        ValueError: when ``model`` is no ``PeftModel``, has several active adapters, the adapter's
            ``init_lora_weights`` is not ``"eva"``, or neither data nor state dict is given.
    """
    if not _is_peft_model(model):
        raise ValueError("model must be a PeftModel")
    wrapped: Any = model
    if len(wrapped.active_adapters) > 1:
        raise ValueError("`initialize_lora_eva_weights` currently only works with a single active adapter")
    if wrapped.peft_config[adapter_name].init_lora_weights != "eva":
        raise ValueError("`initialize_lora_eva_weights` can only be used with `init_lora_weights='eva'`")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("dataloader is required if eva_state_dict is not provided")
        eva_state_dict = get_eva_state_dict(
            model, dataloader, None, forward_fn, prepare_model_inputs_fn, prepare_layer_inputs_fn,
            adapter_name, gather_distributed_inputs, show_progress_bar,
        )  # fmt: skip
    load_eva_state_dict(model, eva_state_dict, adapter_name)
    return model


def load_eva_state_dict(model: nn.Module, eva_state_dict: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Puts EVA's components into the adapter's layers (keys with or without the ``base_model.model.`` prefix)."""
    tuner: Any = model.base_model
    config = tuner.peft_config[adapter_name]
    options = config.eva_config
    components = {key.removeprefix(PREFIX): value for key, value in eva_state_dict.items()}
    kept: list[str] = []
    missing: list[str] = []
    others: list[str] = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    modules: list[tuple[str, Any]] = list(model.named_modules())
    for full_name, layer in modules:
        name = full_name.removeprefix(PREFIX)
        if not (isinstance(layer, AdapterLayer) and layer.holds(adapter_name)):
            others.append(name)
            continue
        lora: Any = layer
        opts = config.module_options(tuner.name_variants(name))
        r, alpha = int(opts["r"]), float(opts["alpha"])
        if name in components:
            a = components.pop(name)
            rank = a.shape[0]
            if rank == 0:
                _remove(tuner, name, layer, adapter_name)
                continue
            if rank != r and options.adjust_scaling_factors:
                alpha *= rank / r
            if rank != r or module_weight(lora.lora_A[adapter_name]).is_meta:
                _rebuild(lora, adapter_name, config, "eva", rank, alpha)
            module_weight(lora.lora_A[adapter_name]).copy_(a)
            kept.append(name)
        else:
            _rebuild(layer, adapter_name, config, True, r, alpha)
            missing.append(name)
            rank = r
        if rank != config.r:
            rank_pattern[name] = rank
        if alpha != config.lora_alpha:
            alpha_pattern[name] = alpha
    targets: list[str] | set[str] = kept + missing
    if len(targets) >= MIN_TARGETS_TO_CONDENSE:
        targets = minimal_suffixes(targets, others)
    config.target_modules = targets
    config.rank_pattern = rank_pattern
    config.alpha_pattern = alpha_pattern
    if missing:
        warnings.warn(
            f"the following layers were initialized with init_lora_weights=True because they were not found in "
            f"the eva state_dict: {missing}\nEVA supports Linear and Conv1D layers, not Embedding, "
            "MultiheadAttention or convolution layers",
            stacklevel=3,
        )


def _rebuild(layer: Any, adapter_name: str, config: Any, init: Any, r: int, alpha: float) -> None:
    """Re-creates the adapter's tensors in ``layer`` with rank ``r`` (trainability and dtype kept)."""
    before = layer.adapter_parameters(adapter_name)
    trainable = any(p.requires_grad for p in before)
    dtype = next((p.dtype for p in before), None)
    layer.update_layer(adapter_name, _with_init(config, init), r, alpha)
    if dtype is not None:
        layer.cast_adapter(adapter_name, dtype)
    for p in layer.adapter_parameters(adapter_name):
        p.requires_grad_(trainable)


def _with_init(config: Any, init: Any) -> Any:
    """A shallow copy of ``config`` with ``init_lora_weights=init`` (no validation, no warnings)."""
    clone = copy.copy(config)
    clone.init_lora_weights = init
    return clone


def _remove(tuner: Any, name: str, layer: AdapterLayer, adapter_name: str) -> None:
    """EVA gave ``name`` rank 0: the adapter leaves the layer (the layer leaves the model if it held no other)."""
    if layer.adapter_names == [adapter_name]:
        tuner.model.set_submodule(name, layer.unwrapped())
        if name in tuner.targeted_module_names:
            tuner.targeted_module_names.remove(name)
    else:
        layer.delete_adapter(adapter_name)


def minimal_suffixes(targets: Iterable[str], others: Iterable[str]) -> set[str]:
    """The fewest name suffixes that match every name of ``targets`` and no name of ``others`` (PEFT condenses
    long target lists this way)."""

    def suffixes(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]

    taken = {s for name in others for s in suffixes(name)}
    chosen: set[str] = set()
    for name in sorted(set(targets), key=suffixes):
        if any(name == s or name.endswith("." + s) for s in chosen):
            continue
        chosen.add(next(s for s in suffixes(name) if s not in taken))
    return chosen
