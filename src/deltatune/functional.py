"""PEFT's public functional API: adapters on a model without the ``PeftModel`` wrapper, and adapter state
dicts for custom training loops, FSDP and integrations.

- :func:`inject_adapter_in_model`: wraps the targets of a config in adapter layers, in place, and returns
  the model (no ``PeftModel``; ``model.peft_config`` records the configs);
- :func:`get_peft_model_state_dict` / :func:`set_peft_model_state_dict`: the adapter tensors under PEFT's
  saved keys (adapter name removed), and back;
- :func:`get_base_model_state_dict` / :func:`set_base_model_state_dict`: the base model's own state dict
  with the original key names (no adapter tensors, no ``base_layer.``).

Each accepts a :class:`~deltatune.PeftModel`, its tuner, or a plain model prepared with
:func:`inject_adapter_in_model`; :func:`set_adapter`, :func:`delete_adapter`, :func:`set_requires_grad` and
:func:`cast_adapter_dtype` manage the adapters of such a model (PEFT's ``peft.functional``).
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any

import torch
from torch import nn

from ._files import resolve_file
from .config import PeftConfig, TargetingConfig
from .layer_types import is_linear_like
from .layers import AdapterLayer
from .matching import match_target
from .modules_to_save import ModulesToSaveWrapper
from .registry import spec_for
from .serialization import (
    PREFIX,
    LoadResult,
    embedding_module_names,
    embedding_tensors,
    get_adapter_state_dict,
    saved_to_memory_key,
    set_adapter_state_dict,
)
from .tuner import AdapterModel

__all__ = [
    "EMBEDDING_LAYER_NAMES",
    "cast_adapter_dtype",
    "delete_adapter",
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "resolve_save_embedding_layers",
    "set_adapter",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "set_requires_grad",
    "tuner_of",
]

#: Module names whose targeting makes ``save_embedding_layers="auto"`` save the full embedding weights.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def tuner_class(config: TargetingConfig) -> type[AdapterModel]:
    """The tuner class of ``config``'s method (its registry entry's, else :class:`AdapterModel`)."""
    tuner = spec_for(config).tuner_cls or AdapterModel
    if not issubclass(tuner, AdapterModel):
        raise TypeError(f"the tuner of {type(config).__name__} is not an AdapterModel: {tuner!r}")
    return tuner


def tuner_of(model: nn.Module) -> tuple[AdapterModel, str]:
    """(the tuner behind ``model``, the prefix of its keys in ``model.state_dict()``).

    Raises:
        ValueError: when ``model`` carries no deltatune adapter.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile
    if isinstance(model, AdapterModel):
        return model, "model."
    base = getattr(model, "base_model", None)
    if isinstance(base, AdapterModel):
        return base, PREFIX
    tuner = model.__dict__.get("_deltatune_tuner")
    if isinstance(tuner, AdapterModel):
        return tuner, ""
    raise ValueError(
        f"{type(model).__name__} carries no deltatune adapter; use get_peft_model() or inject_adapter_in_model()"
    )


def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Wraps the targets of ``peft_config`` in adapter layers, in place, and returns ``model``.

    The model keeps its class and forward; ``model.peft_config`` maps adapter names to configs. Calling it
    again with another name adds an adapter and, as in PEFT, makes it the active one, trainable unless its
    config has ``inference_mode`` (the earlier adapters keep their ``requires_grad``; :func:`set_adapter`
    switches). With ``low_cpu_mem_usage`` the adapter tensors are created on the ``meta`` device
    (:func:`set_peft_model_state_dict` materialises them). With ``state_dict`` (an adapter checkpoint, e.g. one
    saved without its config) the modules its keys name are adapted instead of the config's targets, with a
    warning where the two differ (PEFT's rule; only the keys are read, the stored config then names those
    modules).

    Raises:
        TypeError: for a config that is not one of deltatune's adapter configs.
        ValueError: as :func:`~deltatune.get_peft_model` does for invalid targets; for ``state_dict`` with a
            config that uses ``target_parameters``.
    """
    if not isinstance(peft_config, TargetingConfig):
        raise TypeError(f"expected a deltatune adapter config, got {type(peft_config).__name__}")
    if state_dict is not None:
        peft_config = _config_from_state_dict(model, peft_config, state_dict)
    tuner = model.__dict__.get("_deltatune_tuner")
    if isinstance(tuner, AdapterModel):
        trainable = [p for p in model.parameters() if p.requires_grad]
        tuner.inject_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
        tuner.set_adapter(adapter_name, inference_mode=bool(peft_config.inference_mode))
        for p in trainable:  # what was trainable stays so, as in PEFT
            p.requires_grad_(True)
    else:
        tuner = tuner_class(peft_config)(
            model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage
        )
        # kept outside the module tree (a plain attribute), so the model's modules and state dict are unchanged
        object.__setattr__(model, "_deltatune_tuner", tuner)
    object.__setattr__(model, "peft_config", tuner.peft_config)
    return model


def _config_from_state_dict(
    model: nn.Module, config: TargetingConfig, state_dict: dict[str, torch.Tensor]
) -> TargetingConfig:
    """A copy of ``config`` that targets exactly the modules named by ``state_dict``'s adapter keys."""
    if getattr(config, "target_parameters", None):
        raise ValueError(
            "inject_adapter_in_model(state_dict=...) cannot be used with a config that sets target_parameters; "
            "inject without the state_dict"
        )
    marker = "." + spec_for(config).prefix
    wanted = {k.rsplit(marker, 1)[0].removeprefix("_orig_mod.") for k in state_dict if marker in k}
    if not wanted:
        raise ValueError(
            f"inject_adapter_in_model: the state_dict holds no adapter keys (none contains {marker!r})"
        )
    modules = dict(model.named_modules())
    wanted = {n.removeprefix(PREFIX) if n not in modules else n for n in wanted}
    from_config = {
        n
        for n, m in modules.items()
        if n and match_target(config, [n], is_linear_like(m), lambda: False) is not None
    }
    found = wanted & set(modules)
    if found != from_config:
        warnings.warn(
            "inject_adapter_in_model: the state_dict names other modules than the config targets; adapting the "
            f"state_dict's. Only in the config: {sorted(from_config - found)}; only in the state_dict: "
            f"{sorted(found - from_config)}",
            RuntimeWarning,
            stacklevel=3,
        )
    narrowed = copy.copy(config)
    narrowed.target_modules = "|".join(re.escape(n) for n in sorted(wanted)) or None
    narrowed.exclude_modules = None
    if hasattr(narrowed, "layers_to_transform"):
        narrowed.layers_to_transform = None
    return narrowed


def set_adapter(
    model: nn.Module,
    adapter_name: str | list[str],
    inference_mode: bool = False,
    layer_cls: type | None = None,
) -> None:
    """Makes ``adapter_name`` (one name or a list) the active adapters of ``model``, trainable unless
    ``inference_mode`` (PEFT's ``peft.functional.set_adapter``; ``layer_cls`` is accepted for its signature).

    Raises:
        ValueError: for an unknown adapter name, or a model without deltatune adapters.
    """
    tuner, _ = tuner_of(model)
    tuner.set_adapter(adapter_name, inference_mode=inference_mode)


def delete_adapter(
    model: nn.Module, adapter_name: str, prefix: str | None = None, layer_cls: type | None = None
) -> list[str] | None:
    """Removes ``adapter_name`` from every layer of ``model`` (and from ``model.peft_config``); returns the
    active adapters left, or None when there are none (PEFT's ``peft.functional.delete_adapter``; ``prefix``
    and ``layer_cls`` are accepted for its signature).

    Raises:
        ValueError: for an unknown adapter name, or a model without deltatune adapters.
    """
    tuner, _ = tuner_of(model)
    tuner.delete_adapter(adapter_name)
    return tuner.active_adapters or None


def set_requires_grad(model: nn.Module, adapter_names: str | list[str], requires_grad: bool = True) -> None:
    """Turns gradients of the named adapters (active or not, ``modules_to_save`` copies included) on or off
    (PEFT's ``peft.functional.set_requires_grad``).

    Raises:
        ValueError: for an unknown adapter name, or a model without deltatune adapters.
    """
    tuner, _ = tuner_of(model)
    tuner.set_requires_grad(adapter_names, requires_grad)


def cast_adapter_dtype(model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
    """Casts ``adapter_name``'s float16/bfloat16 tensors to float32 (PEFT's ``peft.functional.cast_adapter_dtype``);
    nothing when ``autocast_adapter_dtype`` is False.

    Raises:
        ValueError: for a model without deltatune adapters.
    """
    tuner, _ = tuner_of(model)
    if not autocast_adapter_dtype:
        return
    for _, layer in tuner.adapter_layers():
        if any(p.dtype in (torch.float16, torch.bfloat16) for p in layer.adapter_parameters(adapter_name)):
            layer.cast_adapter(adapter_name, torch.float32)


def resolve_save_embedding_layers(tuner: AdapterModel, config: TargetingConfig, choice: bool | str) -> bool:
    """PEFT's ``save_embedding_layers``: ``"auto"`` saves them when ``target_modules`` names an embedding layer
    (``embed_tokens``, ``lm_head``) or the model's ``vocab_size`` differs from its base's, with a warning; True needs a transformers-style model (else a warning)."""
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    if choice == "auto" and (
        peft_type == "TRAINABLE_TOKENS" or getattr(config, "trainable_token_indices", None) is not None
    ):
        return False  # PEFT's rule: trainable tokens are there to save only a few rows
    if choice == "auto":
        targets = config.target_modules
        if isinstance(targets, str) and targets != "all-linear":
            names = [n for n, _ in tuner.model.named_modules()]
            targeted = any(
                re.fullmatch(targets, n) or re.match(targets, n)
                for n in names
                if any(re.match(rf"(.*\.)?{e}$", n) for e in EMBEDDING_LAYER_NAMES)
            )
        else:
            targeted = targets is not None and any(e in targets for e in EMBEDDING_LAYER_NAMES)
        if targeted:
            reason = "embedding layers found in `target_modules`"
        elif _vocabulary_resized(tuner.model, config.base_model_name_or_path):
            reason = "the embedding layer has been resized during finetuning"
        else:
            return False
        warnings.warn(f"Setting `save_embedding_layers` to `True` as {reason}.", stacklevel=4)
        choice = True
    if choice and not embedding_module_names(tuner.model):
        warnings.warn(
            "Could not identify embedding layer(s) because the model is not a 🤗 transformers model.",
            stacklevel=4,
        )
        return False
    return bool(choice)


def _vocabulary_resized(model: nn.Module, base_id: str | None) -> bool:
    """Whether the model's ``vocab_size`` differs from its base's config (a local folder, or a Hub id already in
    the local cache: saving never goes to the network)."""
    model_config: Any = getattr(model, "config", None)
    vocab = getattr(model_config, "vocab_size", None)
    if not vocab or not base_id:
        return False
    try:
        resolve_file(base_id, "config.json", local_files_only=True)
        base = type(model_config).from_pretrained(base_id, local_files_only=True)
    except (FileNotFoundError, OSError, ValueError):
        return False
    return bool(getattr(base, "vocab_size", vocab) != vocab)


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_name`` under PEFT's saved keys (the adapter name removed), as
    ``save_pretrained`` writes them; keys start with ``base_model.model.`` for a ``PeftModel`` and are relative
    to the model for one prepared by :func:`inject_adapter_in_model`.

    Args:
        model: A ``PeftModel``, its tuner, or a model with injected adapters.
        state_dict: Take the values from this state dict of ``model`` (e.g. gathered by DeepSpeed) instead.
        adapter_name: The adapter to export.
        unwrap_compiled: Accepted for PEFT's signature (compiled models are always unwrapped).
        save_embedding_layers: Also export the full embedding weights (see
            :func:`resolve_save_embedding_layers`).
    """
    tuner, prefix = tuner_of(model)
    tensors = get_adapter_state_dict(tuner, adapter_name)
    config = tuner.peft_config[adapter_name]
    if resolve_save_embedding_layers(tuner, config, save_embedding_layers):
        tensors.update(embedding_tensors(tuner, adapter_name))
    if state_dict is not None:
        tensors = _values_from(tensors, state_dict, tuner, adapter_name, prefix)
    if prefix == PREFIX:
        return tensors
    return {(prefix if prefix != "model." else PREFIX) + k[len(PREFIX) :]: v for k, v in tensors.items()}


def _values_from(
    tensors: dict[str, torch.Tensor],
    state_dict: dict[str, torch.Tensor],
    tuner: AdapterModel,
    adapter_name: str,
    prefix: str,
) -> dict[str, torch.Tensor]:
    """``tensors`` with their values taken from a full state dict of the model; a tensor of the model that the
    state dict lacks is left out (as PEFT does: the state dict says what is saved), one computed for the export
    (no tensor of the model) is kept."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        memory = saved_to_memory_key(tuner, key, adapter_name)
        if not memory:
            out[key] = tensor
        elif f"{prefix}{memory}" in state_dict:
            out[key] = state_dict[f"{prefix}{memory}"]
        elif f"{prefix}{memory}.weight" in state_dict:  # DoRA's magnitude: PEFT's state_dict key
            out[key] = state_dict[f"{prefix}{memory}.weight"]
    return out


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> LoadResult:
    """Loads PEFT-format adapter tensors (as :func:`get_peft_model_state_dict` returns them) into the existing
    adapter ``adapter_name``.

    Returns:
        ``LoadResult(missing_keys, unexpected_keys)``: the adapter's tensors the dict lacked and the dict's
        keys that matched nothing (PEFT returns torch's ``_IncompatibleKeys`` with the same fields).

    Raises:
        RuntimeError: ("size mismatch ...", also a ``ValueError``) when a tensor's shape differs, unless
            ``ignore_mismatched_sizes``.
    """
    tuner, prefix = tuner_of(model)
    if prefix not in ("", PREFIX):
        prefix = ""
    tensors = {
        (PREFIX + k if prefix == "" and not k.startswith(PREFIX) else k): v
        for k, v in peft_model_state_dict.items()
    }
    return set_adapter_state_dict(
        tuner, tensors, adapter_name, strict=False, ignore_mismatched_sizes=ignore_mismatched_sizes
    )


def _base_key(key: str) -> str | None:
    """A state-dict key of the adapted model as the base model had it (None for adapter tensors)."""
    parts = key.split(".")
    if "modules_to_save" in parts:
        return None
    return ".".join(p for p in parts if p not in ("base_layer", "original_module"))


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with its original keys: adapter tensors and ``modules_to_save`` copies left
    out, ``base_layer.``/``original_module.`` removed (merged adapters stay merged in the weights)."""
    tuner, _ = tuner_of(model)
    skip = _adapter_keys(tuner)
    out: dict[str, torch.Tensor] = {}
    for key, value in tuner.model.state_dict().items():
        if key in skip:
            continue
        base = _base_key(key)
        if base is not None:
            out[base] = value
    return out


def _adapter_keys(tuner: AdapterModel) -> set[str]:
    """Keys (in the user's model) of every adapter tensor, adapter state and ``modules_to_save`` copy: in an
    adapter layer, everything but its ``base_layer``."""
    keys: set[str] = set()
    for name, module in tuner.model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, AdapterLayer):
            keys.update(prefix + k for k in module.state_dict() if not k.startswith("base_layer."))
        elif isinstance(module, ModulesToSaveWrapper):
            keys.update(f"{prefix}modules_to_save.{k}" for k in module.modules_to_save.state_dict())
    return keys


def set_base_model_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> Any:
    """Loads a base-model state dict (original keys) into the adapted model; the inverse of
    :func:`get_base_model_state_dict`. Returns torch's ``(missing_keys, unexpected_keys)``, in the base keys."""
    tuner, _ = tuner_of(model)
    skip = _adapter_keys(tuner)
    mapping = {
        base: key
        for key in tuner.model.state_dict()
        if key not in skip and (base := _base_key(key)) is not None
    }
    renamed = {mapping[k]: v for k, v in state_dict.items() if k in mapping}
    unexpected = [k for k in state_dict if k not in mapping]
    result = tuner.model.load_state_dict(renamed, strict=False)
    inverse = {v: k for k, v in mapping.items()}
    missing = [inverse[k] for k in result.missing_keys if k in inverse]
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"Error(s) in loading state_dict: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return type(result)(missing, unexpected)
