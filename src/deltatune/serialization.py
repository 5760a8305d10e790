"""Adapter files: PEFT's key layout, in one place (the safetensors I/O is :mod:`._weights_io`, re-exported).

In memory an adapter tensor is ``base_model.model.<module>.<tensor>.<adapter>[.<rest>]`` (PEFT's
layout); on disk the adapter name is dropped (``…q_proj.lora_A.weight``, ``…q_proj.hada_w1_a``) and a
``modules_to_save`` copy is stored under the plain module path (``…classifier.weight``). Keys saved
against transformers 4.x module names are renamed with the model's own conversion rules on load.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from ._layer_helpers import is_bias_name
from ._weights_io import (
    SAFETENSORS_WEIGHTS_NAME,
    WEIGHTS_NAME,
    check_config_fits_file,
    check_finite,
    load_adapter_weights,
    save_adapter_weights,
)
from .layers import AdapterLayer
from .modules_to_save import AdapterLayerHolder, ModulesToSaveWrapper
from .registry import available_methods, get_method, specs_for_peft_type
from .tuner import AdapterModel

logger = logging.getLogger(__name__)

__all__ = [
    "PREFIX",
    "SAFETENSORS_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "AdapterShapeMismatchError",
    "LoadResult",
    "check_config_fits_file",
    "check_finite",
    "embedding_module_names",
    "embedding_tensors",
    "get_adapter_state_dict",
    "load_adapter_weights",
    "save_adapter_weights",
    "saved_to_memory_key",
    "set_adapter_state_dict",
]

PREFIX = "base_model.model."


# ---- key mapping --------------------------------------------------------------------------------
def get_adapter_state_dict(tuner: AdapterModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_name`` under PEFT's saved key names (each layer's through the tuner's
    :meth:`~deltatune.tuner.AdapterModel.export_layer_tensors` hook, plus its ``extra_saved_tensors``)."""
    tuner.before_export(adapter_name)
    out: dict[str, torch.Tensor] = {}
    for name, layer in tuner.adapter_layers():
        if not layer.holds(adapter_name):
            continue
        for key, tensor in tuner.export_layer_tensors(name, layer, adapter_name).items():
            out[f"{PREFIX}{name}.{key}"] = tensor
    for name, wrapper in tuner.saved_module_wrappers():
        if adapter_name in wrapper.modules_to_save:
            for key, tensor in wrapper.modules_to_save[adapter_name].state_dict().items():
                out[f"{PREFIX}{name}.{key}"] = tensor
    for key, tensor in tuner.extra_saved_tensors(adapter_name).items():
        out.setdefault(f"{PREFIX}{key}", tensor)
    return out


def _owner(key: str, owners: dict[str, Any]) -> tuple[str, Any] | None:
    """The longest known module path that ``key`` lies under."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:i])
        if path in owners:
            return path, owners[path]
    return None


def _in_memory_key(key: str, owners: dict[str, Any], adapter_name: str) -> str | None:
    """The state-dict key (in the user's model) a saved key loads into; ``owners`` maps module paths to adapter
    layers and wrappers, and its :data:`DIRECT_KEYS` entry lists the keys that load as they are (base weights
    an adapter saves: trained biases, embeddings)."""
    found = _owner(key, owners)
    direct: _DirectKeys = owners[DIRECT_KEYS]
    if found is None:
        return key if direct.covers(key) else None
    path, module = found
    rest = key[len(path) + 1 :]
    if isinstance(module, ModulesToSaveWrapper):
        if rest.startswith("original_module."):  # PEFT's bias="all" files hold these too
            return key
        rest = rest.removeprefix("modules_to_save.")
        return f"{path}.modules_to_save.{adapter_name}.{rest}"
    attr, _, tail = rest.partition(".")
    if isinstance(module, AdapterLayer) and attr in module.adapter_param_names:
        container = getattr(module, attr)
        if isinstance(container, torch.nn.ModuleDict):
            return f"{path}.{attr}.{adapter_name}.{tail}"
        return f"{path}.{attr}.{adapter_name}"
    return key  # e.g. "<path>.base_layer.bias"


def _assign(
    tuner: AdapterModel, target: str, tensor: torch.Tensor, param: torch.Tensor, owners: dict[str, Any]
) -> None:
    """Puts ``tensor`` in place of the ``meta`` parameter ``target`` (on its layer's base device)."""
    parent, _, leaf = target.rpartition(".")
    found = _owner(target, owners)
    layer = found[1] if found is not None else None
    device = layer.base_weight.device if isinstance(layer, AdapterLayer) else tensor.device
    value = torch.nn.Parameter(tensor.to(dtype=param.dtype, device=device), requires_grad=param.requires_grad)
    setattr(tuner.model.get_submodule(parent), leaf, value)


def saved_to_memory_key(tuner: AdapterModel, saved_key: str, adapter_name: str) -> str | None:
    """The key in the user's model's state dict that a saved key of ``adapter_name`` loads into (None: none)."""
    return _in_memory_key(saved_key.removeprefix(PREFIX), _owners(tuner, adapter_name), adapter_name)


def _raise_if_other_method(tuner: AdapterModel, adapter_name: str, keys: list[str]) -> None:
    """A clearer error when the tensors belong to another method than the config says."""
    config_type = str(tuner.peft_config[adapter_name].peft_type)
    own = {a for spec in specs_for_peft_type(config_type) for a in spec.adapter_param_names()}
    for name in available_methods():
        spec = get_method(name)
        distinct = set(spec.adapter_param_names()) - own
        if spec.peft_type == config_type or not distinct:
            continue
        if any(f".{a}" in k for k in keys for a in distinct):
            raise ValueError(
                f"the adapter config says peft_type={config_type} but its tensors look like {spec.peft_type} "
                f"({keys[0]}); the config and weights do not belong together"
            )


def _adapter_owned(
    key: str, target: str, owners: dict[str, Any], adapter_name: str, saved_extras: set[str]
) -> bool:
    """Whether the saved ``key`` (in-memory ``target``) is a tensor an adapter file may write: an adapter
    parameter of an adapter layer, this adapter's ``modules_to_save`` copy, an extra tensor the method saves
    itself, or a key PEFT's files hold directly (any bias, for ``bias="all"``/``"lora_only"`` files; the
    embedding modules' weights, for ``save_embedding_layers``; see :class:`_DirectKeys`)."""
    if target in saved_extras or f".modules_to_save.{adapter_name}." in f".{target}":
        return True
    direct = owners.get(DIRECT_KEYS)
    if direct is not None and direct.covers(key):
        return True
    found = _owner(target, owners)
    if found is None:
        return False
    path, module = found
    attr = target[len(path) + 1 :].split(".", 1)[0]
    return attr in getattr(module, "adapter_param_names", ())


class LoadResult(NamedTuple):
    """What loading adapter tensors matched: PEFT's (and torch's) ``missing_keys`` / ``unexpected_keys``.

    ``missing_keys`` lists the adapter's in-memory keys that the file did not provide (empty for a complete
    file); ``unexpected_keys`` the file's keys that match nothing in the model.
    """

    missing_keys: list[str]
    unexpected_keys: list[str]


class AdapterShapeMismatchError(RuntimeError, ValueError):
    """An adapter tensor's shape differs from the model's. A ``RuntimeError`` with "size mismatch" like torch's
    ``load_state_dict`` (what ``peft`` raises) and a ``ValueError`` (what deltatune raised before)."""


def embedding_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the input/output embedding modules of a transformers-style model (``get_input_embeddings``),
    as the module that holds the weight (``embed_tokens.base_layer`` when an adapter wraps it)."""
    names: list[str] = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        try:
            layer = fn() if callable(fn) else None
        except (NotImplementedError, AttributeError):  # transformers vision models have no embeddings
            layer = None
        if layer is None:
            continue
        held = layer.base_layer if isinstance(layer, AdapterLayer) else layer
        for name, module in model.named_modules():
            if module is held and name and name not in names:
                names.append(name)
    return names


def embedding_tensors(tuner: AdapterModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """The full weights of the model's input/output embedding modules under PEFT's keys (for
    ``save_embedding_layers``): when an adapter wraps one of them, only the wrapped ones (their base layer), as
    PEFT; an untargeted embedding (a tied or separate head) is not the adapter's to overwrite on load. An
    embedding with a ``modules_to_save`` copy saves the saved adapter's copy without its name,
    ``…modules_to_save.weight``, as PEFT."""
    out: dict[str, torch.Tensor] = {}
    state = tuner.model.state_dict()
    own = f".modules_to_save.{adapter_name}."
    names = embedding_module_names(tuner.model)
    wrapped = [n for n in names if _wraps(tuner.model, n)]
    for name in wrapped or names:
        prefix = name + "."
        out.update(
            {
                f"{PREFIX}{k.replace(own, '.modules_to_save.')}": v
                for k, v in state.items()
                if k.startswith(prefix)
            }
        )
    return out


def _wraps(model: torch.nn.Module, name: str) -> bool:
    """Whether module ``name`` is the base layer of an adapter layer."""
    parent, _, leaf = name.rpartition(".")
    return leaf == "base_layer" and isinstance(model.get_submodule(parent), AdapterLayer)


#: Key of the owners table (:func:`_owners`) holding the keys that load as they are.
DIRECT_KEYS = "\x00direct"


class _DirectKeys:
    """Saved keys that name base-model tensors directly: the extra tensors the method saves, any bias (PEFT's
    ``bias="all"``/``"lora_only"`` files hold them, whatever the loading config says) and anything under the
    model's embedding modules (``save_embedding_layers``). Other base weights are never overwritten."""

    def __init__(self, keys: set[str], prefixes: list[str]) -> None:
        self.keys, self.prefixes = keys, tuple(prefixes)

    def covers(self, key: str) -> bool:
        if key in self.keys or is_bias_name(key):
            return True
        return bool(self.prefixes) and key.startswith(self.prefixes)


def _owners(tuner: AdapterModel, adapter_name: str) -> dict[str, Any]:
    """Module path → adapter layer or wrapper, plus the :data:`DIRECT_KEYS` entry."""
    owners: dict[str, Any] = dict(tuner.adapter_layers())
    owners.update(dict(tuner.saved_module_wrappers()))
    extra = set(tuner.extra_saved_tensors(adapter_name)) if adapter_name in tuner.peft_config else set()
    owners[DIRECT_KEYS] = _DirectKeys(extra, [n + "." for n in embedding_module_names(tuner.model)])
    return owners


def set_adapter_state_dict(
    tuner: AdapterModel,
    state_dict: Mapping[str, torch.Tensor],
    adapter_name: str,
    strict: bool = True,
    ignore_mismatched_sizes: bool = False,
    allow_base_weights: bool = False,
) -> LoadResult:
    """Copies saved adapter tensors into ``adapter_name``.

    A key that would overwrite a frozen weight of the base model (``…base_layer.weight``,
    ``…original_module.weight``: anything the method does not save itself and PEFT's files do not hold
    directly) is refused, since ``disable_adapter()`` and ``unload()`` could then no longer give the original
    model back; ``allow_base_weights=True`` loads such keys anyway (``strict=False`` alone skips them with a
    warning).

    Args:
        tuner: The tuner holding the adapter.
        state_dict: Tensors under PEFT's saved keys (``base_model.model.`` prefix optional).
        adapter_name: The adapter to fill.
        strict: Refuse keys that match nothing and adapter tensors the file lacks.
        ignore_mismatched_sizes: Skip (with a warning) tensors whose shape differs instead of raising.
        allow_base_weights: Load keys that overwrite frozen base-model weights (refused by default).

    Returns:
        The in-memory keys left unfilled and the saved keys that matched nothing.

    Raises:
        AdapterShapeMismatchError: on a shape mismatch (naming the module and both shapes).
        ValueError: with ``strict``, when keys match nothing in the model, would overwrite base weights, or
            adapter tensors are missing.
    """
    owners = _owners(tuner, adapter_name)
    # Tied tensors under every name they have (a tied head's copy loads like the embedding's).
    params: dict[str, torch.Tensor] = dict(tuner.model.named_parameters(remove_duplicate=False))
    params.update(dict(tuner.model.named_buffers(remove_duplicate=False)))
    saved_extras = {
        t for k in tuner.extra_saved_tensors(adapter_name) if (t := _in_memory_key(k, owners, adapter_name))
    }
    base_keys: list[str] = []
    unexpected: list[str] = []
    loaded: set[str] = set()
    legacy_used = 0
    for saved_key, tensor in state_dict.items():
        key = saved_key[len(PREFIX) :] if saved_key.startswith(PREFIX) else saved_key
        target = _in_memory_key(key, owners, adapter_name)
        if target is None or target not in params:
            modern = tuner.aliases.modern(key)
            if modern != key:
                target = _in_memory_key(modern, owners, adapter_name)
                legacy_used += target is not None
        if target is None or target not in params:
            unexpected.append(saved_key)
            continue
        if not allow_base_weights and not _adapter_owned(key, target, owners, adapter_name, saved_extras):
            base_keys.append(saved_key)
            continue
        param = params[target]
        if tuple(param.shape) != tuple(tensor.shape):
            module = target.rsplit(".", 1)[0]
            message = (
                f"size mismatch for {saved_key}: adapter tensor of shape {tuple(tensor.shape)} but {module} "
                f"expects {tuple(param.shape)}: the adapter was trained for a different base model or config"
            )
            if ignore_mismatched_sizes:
                warnings.warn(message + "; skipped (ignore_mismatched_sizes=True)", stacklevel=3)
                continue
            raise AdapterShapeMismatchError(message)
        if param.is_meta:  # created with low_cpu_mem_usage: the loaded tensor becomes the parameter
            _assign(tuner, target, tensor, param, owners)
        else:
            with torch.no_grad():
                param.copy_(tensor.to(dtype=param.dtype, device=param.device))
        loaded.add(target)
    if legacy_used:
        logger.info("loaded %d adapter tensors saved under transformers 4.x module names", legacy_used)
    expected = {k[len(PREFIX) :] for k in get_adapter_state_dict(tuner, adapter_name)}
    expected_memory = {t for k in expected if (t := _in_memory_key(k, owners, adapter_name)) is not None}
    missing = sorted(expected_memory - loaded)
    if base_keys:
        message = (
            f"{len(base_keys)} tensor(s) in the adapter file would overwrite frozen base-model weights, e.g. "
            f"{base_keys[:3]}; an adapter only holds its own tensors, so this file would change the base model "
            "for good (disable_adapter()/unload() would no longer restore it)"
        )
        if strict:
            raise ValueError(f"{message}. Refused; pass allow_base_weights=True if you trust the file")
        logger.warning("%s; skipped (pass allow_base_weights=True to load them)", message)
    if strict and unexpected:
        _raise_if_other_method(tuner, adapter_name, unexpected)
        raise ValueError(
            f"{len(unexpected)} adapter tensors match nothing in the model, e.g. {unexpected[:3]}; the adapter "
            "was made for another model (pass strict=False to load the rest)"
        )
    still_meta = sorted(t for t in expected_memory if t in params and params[t].is_meta and t not in loaded)
    if still_meta:
        raise ValueError(
            f"{len(still_meta)} adapter tensors created with low_cpu_mem_usage=True got no value from the file, "
            f"e.g. {still_meta[:3]}"
        )
    if strict and missing and not ignore_mismatched_sizes:
        raise ValueError(f"the adapter file lacks {len(missing)} tensors, e.g. {missing[:3]}")
    if unexpected:
        logger.warning(
            "ignored %d adapter tensors that match nothing, e.g. %s", len(unexpected), unexpected[:3]
        )
    return LoadResult([f"{PREFIX}{k}" for k in missing], unexpected)


def adapter_key_prefixes(model: torch.nn.Module, adapter_name: str | None = None) -> set[str]:
    """The state-dict key prefixes of what an adapter method added to ``model`` (PEFT's
    ``_get_tuner_state_dict_key_prefixes``): each adapter layer's children, parameters and buffers but the wrapped
    ``base_layer``, and the tuner's own ones but the ``model``. Told apart by structure, not by name, so a base
    module called ``lora_x`` is not taken for an adapter's. Auxiliary wrappers (``modules_to_save`` copies, the
    trainable-token holders) and the layers inside them are left out: their keys are theirs. With
    ``adapter_name``, a per-adapter container (``ModuleDict``/``ParameterDict``) stands for its entry of that
    adapter only.
    """

    def own(module: torch.nn.Module, name: str) -> set[str]:
        found: set[str] = set()
        children = [n for n, _ in module.named_children()]
        local = [n for n, _ in module.named_parameters(recurse=False)] + [
            n for n, _ in module.named_buffers(recurse=False)
        ]
        for attr in children + local:
            if attr in ("base_layer", "model"):
                continue
            prefix = f"{name}.{attr}" if name else attr
            child = getattr(module, attr)
            if adapter_name is None or not isinstance(child, torch.nn.ModuleDict | torch.nn.ParameterDict):
                found.add(prefix)
            elif adapter_name in child:
                found.add(f"{prefix}.{adapter_name}")
        return found

    prefixes: set[str] = set()
    auxiliary: set[str] = set()
    for name, module in model.named_modules():  # parents before children
        if isinstance(module, ModulesToSaveWrapper | AdapterLayerHolder):
            auxiliary.add(name)
        elif isinstance(module, AdapterModel) or (
            isinstance(module, AdapterLayer) and not _under_any(name, auxiliary)
        ):
            prefixes |= own(module, name)
    return prefixes


def _under_any(key: str, prefixes: set[str]) -> bool:
    """Whether ``key`` is one of ``prefixes`` or lies under one at a ``.`` boundary (its depth in lookups)."""
    parts = key.split(".")
    return any(".".join(parts[:n]) in prefixes for n in range(1, len(parts) + 1))


def filter_state_dict_by_key_prefixes(state_dict: Mapping[str, Any], prefixes: set[str]) -> dict[str, Any]:
    """The entries of ``state_dict`` whose key is one of ``prefixes`` or lies under one (PEFT's
    ``_filter_state_dict_by_key_prefixes``; ``"a.b"`` covers ``"a.b.c"``, not ``"a.bc"``)."""
    return {k: v for k, v in state_dict.items() if _under_any(k, prefixes)}
