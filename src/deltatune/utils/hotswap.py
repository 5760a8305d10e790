"""Hot-swapping LoRA adapters in place (PEFT's ``peft.utils.hotswap``, same functions and arguments).

Swapping copies a new adapter's tensors into a loaded one of the same name: no module is added or replaced,
so a model compiled with ``torch.compile`` keeps its graph. Ranks and scales may differ between adapters
only if :func:`prepare_model_for_compiled_hotswap` ran before compiling: it stores each scale as a tensor
(changed in place, where a Python float would be a constant of the graph and force a recompilation) and
zero-pads every adapter to ``target_rank``; a smaller rank then fills the leading rank slots.

    model = PeftModel.from_pretrained(base, "adapter-0")
    prepare_model_for_compiled_hotswap(model, target_rank=16)
    model = torch.compile(model)
    ...
    hotswap_adapter(model, "adapter-1", adapter_name="default")  # no recompilation

The layer-specific work (tensor scales, padding, copying into rank slots) is the method's, through the hooks
of :class:`SwappableLayer` (LoRA's layers have them); this module checks and routes. Only LoRA can be swapped,
as in PEFT; DoRA adapters swap without compilation only.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from ..config import PeftConfig
from ..functional import tuner_of
from ..layers import AdapterLayer
from ..modules_to_save import ModulesToSaveWrapper
from ..registry import available_methods, get_method, spec_for
from ..serialization import load_adapter_weights, saved_to_memory_key

__all__ = [
    "SwappableLayer",
    "check_hotswap_configs_compatible",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "prepare_model_for_compiled_hotswap",
]

_CHECK_COMPILED = ("error", "warn", "ignore")


@runtime_checkable
class SwappableLayer(Protocol):
    """What a layer provides to be hot-swapped (see :mod:`deltatune.methods._lora_hotswap`)."""

    def rank_capacity(self) -> int: ...

    def scalings_to_tensors(self) -> None: ...

    def pad_rank(self, target_rank: int) -> None: ...

    def swap_in(
        self, adapter_name: str, tensors: Mapping[str, torch.Tensor], r: int, alpha: float, config: Any
    ) -> None: ...


def _root(model: nn.Module) -> nn.Module:
    """The model behind a ``torch.compile`` wrapper."""
    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, nn.Module) else model


def _swappable(model: nn.Module) -> list[tuple[str, Any]]:
    """(path, layer) of every adapter layer with the :class:`SwappableLayer` hooks (an ``AdapterLayer``)."""
    found: list[tuple[str, Any]] = []
    for name, module in _root(model).named_modules():
        if isinstance(module, AdapterLayer) and isinstance(module, SwappableLayer):
            found.append((name, module))
    return found


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    config: Any = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Prepares a model holding its first LoRA adapter for hot-swapping after ``torch.compile``: every scale
    becomes a tensor and, with ``target_rank``, every adapter is zero-padded to that rank (outputs unchanged).
    Call it after loading the first adapter and before compiling.

    Args:
        model: The model (a ``PeftModel`` or a module with injected LoRA layers).
        target_rank: The largest rank among the adapters to be swapped in (None: ranks stay).
        config: A ``LoraConfig`` or a dict of them (``model.peft_config``): their ``r`` and ``rank_pattern``
            values are set to ``target_rank``.
        check_compiled: What to do if ``model`` is already compiled: ``"error"``, ``"warn"`` or ``"ignore"``.

    Raises:
        ValueError: for a compiled model (with ``"error"``), an unknown ``check_compiled``, no LoRA layer, a
            ``target_rank`` below an adapter's rank, or a DoRA layer.
    """
    if check_compiled not in _CHECK_COMPILED:
        raise ValueError(
            f"check_compiles should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' instead."
        )
    if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None:
        if check_compiled == "error":
            raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
        if check_compiled == "warn":
            warnings.warn(
                "prepare_model_for_compiled_hotswap was called with a model that is already compiled. This will "
                "likely result in re-compilation, hurting performance. Call the function before compiling the model.",
                stacklevel=2,
            )
    layers = _swappable(model)
    if not layers:
        raise ValueError(
            "No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` after loading "
            "the first adapter and before loading the second adapter."
        )
    for name, layer in layers:  # every check before anything changes
        if not getattr(layer, "tensor_scaling", True):
            layer.scalings_to_tensors()  # raises its own error
        if target_rank is not None and layer.rank_capacity() > target_rank:
            raise ValueError(
                f"Trying to pad the adapter to the target rank {target_rank}, but the original rank is larger "
                f"({layer.rank_capacity()}) in {name}. This is not possible."
            )
    for _, layer in layers:
        layer.scalings_to_tensors()
        if target_rank is not None:
            layer.pad_rank(target_rank)
    if not config or target_rank is None:
        return
    for adapter_config in config.values() if isinstance(config, dict) else [config]:
        adapter_config.r = target_rank
        if adapter_config.rank_pattern:
            adapter_config.rank_pattern = dict.fromkeys(adapter_config.rank_pattern, target_rank)


def _swap_fields(config: PeftConfig) -> tuple[str, ...] | None:
    """The fields two adapters of ``config``'s method must agree on to be swapped (its config class's
    ``HOTSWAP_FIELDS``); None when the method cannot be swapped."""
    fields: tuple[str, ...] | None = getattr(type(config), "HOTSWAP_FIELDS", None)
    return fields


def check_hotswap_configs_compatible(config0: PeftConfig, config1: PeftConfig) -> None:
    """Raises ``ValueError`` unless an adapter with ``config1`` can replace one with ``config0``: the same method,
    one that can be swapped (LoRA), and the same values of the fields that change the output without being in
    the tensors (``use_rslora``, ``lora_dropout``, ``alpha_pattern``, ``use_dora``), as PEFT checks."""
    type0, type1 = (str(c.peft_type).rpartition(".")[2] for c in (config0, config1))
    if type0 != type1:
        raise ValueError(f"Incompatible PEFT types found: {type0} and {type1}")
    fields = _swap_fields(config0)
    if fields is None:
        specs = (get_method(name) for name in available_methods())
        swappable = dict.fromkeys(s.peft_type for s in specs if getattr(s.config_cls, "HOTSWAP_FIELDS", None))
        raise ValueError(f"Hotswapping only supports {', '.join(swappable)} but {type0} was passed.")
    missing = object()
    for key in fields:
        val0, val1 = getattr(config0, key, missing), getattr(config1, key, missing)
        if val0 != val1:
            raise ValueError(f"Configs are incompatible: for {key}, {val0} != {val1}")


def _owner(key: str, owners: Mapping[str, nn.Module]) -> tuple[str, nn.Module] | None:
    """The deepest module of ``owners`` that ``key`` lies under."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:i])
        if path in owners:
            return path, owners[path]
    return None


def _own_tensor(module: nn.Module, rest: str, adapter_name: str, prefix: str) -> bool:
    """Whether ``rest`` (a key under ``module``) names a tensor of ``adapter_name`` a swap may replace."""
    attr, _, tail = rest.partition(".")
    if tail.split(".", 1)[0] != adapter_name:
        return False
    if isinstance(module, ModulesToSaveWrapper):
        ok = attr == "modules_to_save"
    else:
        ok = (
            isinstance(module, AdapterLayer)
            and attr in module.adapter_param_names
            and attr.startswith(prefix)
        )
    try:
        module.get_parameter(rest)
    except AttributeError:
        return False
    return ok


def _split(
    root: nn.Module, state_dict: Mapping[str, torch.Tensor], adapter_name: str, prefix: str
) -> dict[str, dict[str, torch.Tensor]]:
    """The new tensors by owning module path (an adapter layer or ``modules_to_save`` wrapper).

    Raises:
        RuntimeError: for keys that name no tensor of ``adapter_name`` (PEFT's error).
    """
    owners = {n: m for n, m in root.named_modules() if isinstance(m, AdapterLayer | ModulesToSaveWrapper)}
    by_owner: dict[str, dict[str, torch.Tensor]] = {}
    unexpected: list[str] = []
    for raw_key, tensor in state_dict.items():
        key = raw_key.removeprefix("_orig_mod.")
        found = _owner(key, owners)
        if found is None or not _own_tensor(found[1], key[len(found[0]) + 1 :], adapter_name, prefix):
            unexpected.append(raw_key)
            continue
        by_owner.setdefault(found[0], {})[key[len(found[0]) + 1 :]] = tensor
    if unexpected:
        raise RuntimeError(
            f"Hot swapping the adapter did not succeed, unexpected keys found: {', '.join(unexpected)}"
        )
    return by_owner


def _check_prepared_ranks(
    root: nn.Module, by_owner: dict[str, dict[str, torch.Tensor]], adapter_name: str
) -> None:
    """A layer prepared for compiled swapping (its scale a tensor) cannot grow: the graph holds its shapes."""
    for path, tensors in by_owner.items():
        layer = root.get_submodule(path)
        if not isinstance(layer, AdapterLayer) or not isinstance(
            getattr(layer, "scaling", {}).get(adapter_name), torch.Tensor
        ):
            continue
        for rest, new in tensors.items():
            old = layer.get_parameter(rest)
            if any(n > o for n, o in zip(new.shape, old.shape, strict=False)):
                raise ValueError(
                    f"the new adapter's {path}.{rest} has shape {tuple(new.shape)}, a larger rank than the "
                    f"{tuple(old.shape)} prepared by prepare_model_for_compiled_hotswap; prepare the model with a "
                    "target_rank of at least the largest rank among the adapters to swap in"
                )


def hotswap_adapter_from_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    adapter_name: str,
    config: Any,
    parameter_prefix: str | None = None,
) -> None:
    """Replaces the tensors of the loaded adapter ``adapter_name`` by those of ``state_dict``, in place.

    Args:
        model: The model holding the adapter (possibly compiled).
        state_dict: The new adapter's tensors under the model's own keys
            (``base_model.model.fc1.lora_A.default.weight``); layers it leaves out get zeros.
        adapter_name: The adapter to replace (it keeps its name).
        config: The new adapter's ``LoraConfig`` (its rank, alpha and patterns set the scales).
        parameter_prefix: The prefix of the method's tensor names (PEFT's default ``"lora_"``); None: the prefix
            of ``config``'s method, which is the same for LoRA.

    Raises:
        ValueError: when the adapter is merged, or a new rank exceeds what a prepared model holds.
        RuntimeError: when ``state_dict`` holds tensors that the adapter does not have (other targets).
    """
    root = _root(model)
    prefix = spec_for(config).prefix if parameter_prefix is None else parameter_prefix
    if any(adapter_name in m.merged_adapters for m in root.modules() if isinstance(m, AdapterLayer)):
        raise ValueError(
            f"Cannot hot-swap adapter '{adapter_name}' because it is currently merged into the base weights; "
            "unmerge it first with `model.unmerge_adapter()` (swapping merged weights would corrupt them)"
        )
    by_owner = _split(root, state_dict, adapter_name, prefix)
    _check_prepared_ranks(root, by_owner, adapter_name)
    tuner, key_prefix = tuner_of(model)
    for path, layer in _swappable(root):
        if not layer.holds(adapter_name):
            continue
        tensors = by_owner.get(path, {})
        for attr in layer.adapter_param_names:  # tensors the new adapter lacks: zeros (PEFT's rule)
            container = getattr(layer, attr)
            if attr.startswith(prefix) and adapter_name in container:
                item = container[adapter_name]
                for name, p in item.named_parameters() if isinstance(item, nn.Module) else [("", item)]:
                    if f"{attr}.{adapter_name}{'.' if name else ''}{name}" not in tensors:
                        with torch.no_grad():
                            p.zero_()
        if tensors:
            name = path.removeprefix(key_prefix)
            r, alpha = config.rank_and_alpha(tuner.name_variants(name))
            layer.swap_in(adapter_name, tensors, r, alpha, config)
    for path, tensors in by_owner.items():
        wrapper = root.get_submodule(path)
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        for rest, new in tensors.items():
            old = wrapper.get_parameter(rest)
            if old.shape != new.shape:
                raise RuntimeError(
                    f"Hot swapping {path}.{rest} failed: shape {tuple(new.shape)} != {tuple(old.shape)}"
                )
            with torch.no_grad():
                old.copy_(new.to(old.dtype))


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str | os.PathLike[str],
    adapter_name: str,
    torch_device: str | torch.device | None = None,
    **kwargs: Any,
) -> None:
    """Replaces the loaded adapter ``adapter_name`` by the saved adapter at ``model_name_or_path`` (a folder or
    a Hub repo id, PEFT's format), in place; the model may be compiled.

    Args:
        model: The ``PeftModel`` holding the adapter.
        model_name_or_path: Where the new adapter is saved.
        adapter_name: The adapter to replace; it keeps its name.
        torch_device: Where to read the new tensors to (default the CPU; they are copied onto the adapter's
            device).
        **kwargs: ``subfolder`` and Hub options (``revision``, ``cache_dir``, ``token``).

    Raises:
        ValueError: for an unknown adapter name, incompatible configs (another method, a different
            ``use_rslora``, ``lora_dropout``, ``alpha_pattern`` or ``use_dora``), a merged adapter, or a rank
            larger than a prepared model holds.
        RuntimeError: when the new adapter targets modules the loaded one does not.
    """
    hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token") if kwargs.get(k) is not None}
    subfolder = kwargs.get("subfolder")
    config = PeftConfig.from_pretrained(model_name_or_path, subfolder=subfolder, **hub)
    tuner, key_prefix = tuner_of(model)
    if adapter_name not in tuner.peft_config:
        raise ValueError(
            f"no adapter named {adapter_name!r} to hot-swap; the model holds: {', '.join(tuner.peft_config)}"
        )
    check_hotswap_configs_compatible(tuner.peft_config[adapter_name], config)
    device = "cpu" if torch_device is None else str(torch_device)
    saved = load_adapter_weights(model_name_or_path, subfolder=subfolder, device=device, **hub)
    state: dict[str, torch.Tensor] = {}
    for saved_key, tensor in saved.items():
        target = saved_to_memory_key(tuner, saved_key, adapter_name)
        if target is None:
            modern = tuner.aliases.modern(saved_key.removeprefix("base_model.model."))
            target = saved_to_memory_key(tuner, modern, adapter_name)
        state[key_prefix + target if target is not None else _named(saved_key, adapter_name, config)] = tensor
    hotswap_adapter_from_state_dict(model, state, adapter_name, config)


def _named(saved_key: str, adapter_name: str, config: PeftConfig) -> str:
    """A saved key no layer of the model takes, named as PEFT names it in memory (the adapter name after the
    method's tensor name: ``lin1.lora_A.weight`` -> ``lin1.lora_A.default.weight``), for the error."""
    head, sep, tail = saved_key.rpartition(spec_for(config).prefix)
    if not sep:
        return saved_key
    name, dot, rest = tail.partition(".")
    return f"{head}{sep}{name}.{adapter_name}{dot}{rest}" if dot else f"{saved_key}.{adapter_name}"
