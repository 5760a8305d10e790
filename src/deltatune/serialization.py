"""Adapter files: PEFT's key layout and safetensors I/O, in one place (writes go through :mod:`._files`).

In memory an adapter tensor is ``base_model.model.<module>.<tensor>.<adapter>[.<rest>]`` (PEFT's
layout); on disk the adapter name is dropped (``…q_proj.lora_A.weight``, ``…q_proj.hada_w1_a``) and a
``modules_to_save`` copy is stored under the plain module path (``…classifier.weight``). Keys saved
against transformers 4.x module names are renamed with the model's own conversion rules on load.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from ._files import atomic_write_bytes, resolve_file
from .modules_to_save import ModulesToSaveWrapper
from .registry import available_methods, get_method, specs_for_peft_type
from .tuner import AdapterModel

logger = logging.getLogger(__name__)

__all__ = [
    "PREFIX",
    "SAFETENSORS_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "check_config_fits_file",
    "check_finite",
    "get_adapter_state_dict",
    "load_adapter_weights",
    "save_adapter_weights",
    "set_adapter_state_dict",
]

PREFIX = "base_model.model."
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"


# ---- weights I/O --------------------------------------------------------------------------------
def save_adapter_weights(
    tensors: Mapping[str, torch.Tensor], directory: str | os.PathLike[str], safe_serialization: bool = True
) -> str:
    """Writes ``adapter_model.safetensors`` (or ``.bin``) atomically; returns the file path."""
    os.makedirs(directory, exist_ok=True)
    clean: dict[str, torch.Tensor] = {}
    seen: set[tuple[torch.device, int]] = set()
    for key, value in tensors.items():
        tensor = value.detach().contiguous().cpu()
        where = (tensor.device, tensor.untyped_storage().data_ptr())
        if where in seen and tensor.numel() > 0:  # safetensors refuses tensors that share memory
            tensor = tensor.clone()
        seen.add(where)
        clean[key] = tensor
    if safe_serialization:
        from safetensors.torch import save

        path = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
        atomic_write_bytes(path, save(clean, metadata={"format": "pt"}))
    else:
        import io

        buffer = io.BytesIO()
        torch.save(clean, buffer)
        path = os.path.join(directory, WEIGHTS_NAME)
        atomic_write_bytes(path, buffer.getvalue())
    return path


def load_adapter_weights(
    path_or_repo: str | os.PathLike[str], subfolder: str | None = None, device: str = "cpu", **hub_kwargs: Any
) -> dict[str, torch.Tensor]:
    """Reads adapter tensors, preferring safetensors; a legacy ``.bin`` loads with ``weights_only=True``.

    Raises:
        FileNotFoundError: if neither file exists.
        ValueError: if the file is truncated or corrupt, or a ``.bin`` holds anything but tensors.
    """
    try:
        path = resolve_file(path_or_repo, SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, **hub_kwargs)
        safe = True
    except FileNotFoundError as first:
        try:
            path = resolve_file(path_or_repo, WEIGHTS_NAME, subfolder=subfolder, **hub_kwargs)
            safe = False
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no adapter weights in {os.fspath(path_or_repo)!r}: expected {SAFETENSORS_WEIGHTS_NAME} "
                f"(or a legacy {WEIGHTS_NAME}). {first}"
            ) from None
    if safe:
        from safetensors.torch import load_file

        try:
            tensors = load_file(path, device=device)
        except PermissionError:
            raise
        except Exception as err:
            raise ValueError(
                f"{path} is not a readable safetensors file (truncated or corrupt?): {err}"
            ) from err
        check_finite(tensors, path)
        return tensors
    try:
        data = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise ValueError(
            f"refusing to load {path}: it is not a plain tensor checkpoint loadable with weights_only=True "
            f"({type(err).__name__}). deltatune never unpickles arbitrary objects; convert it to safetensors"
        ) from err
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path} does not hold a dict of tensors")
    check_finite(data, path)
    return data


def check_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Raises ``ValueError`` naming the first tensor of ``tensors`` that holds NaN or ±inf.

    Args:
        tensors: Name → tensor (floating tensors are checked; others cannot hold NaN).
        source: The file (or thing) they came from, for the message.
    """
    floats = [(k, t) for k, t in tensors.items() if t.is_floating_point() and t.numel()]
    if not floats:
        return
    finite = torch.stack([torch.isfinite(t).all() for _, t in floats])
    if bool(finite.all()):
        return
    bad = [k for (k, _), ok in zip(floats, finite.tolist(), strict=True) if not ok]
    raise ValueError(
        f"{source}: tensor {bad[0]!r} holds NaN or inf values ({len(bad)} such tensor(s)); the adapter is "
        "corrupt or its training diverged, so its outputs would be meaningless. Use an earlier checkpoint"
    )


def _file_shapes(path_or_repo: str | os.PathLike[str], subfolder: str | None, **hub_kwargs: Any) -> Any:
    """(path, {key: shape}) of a safetensors adapter file, read from its header only; None without one."""
    try:
        path = resolve_file(path_or_repo, SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, **hub_kwargs)
    except FileNotFoundError:
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return path, {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except Exception as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err


def check_config_fits_file(
    config: Any, path_or_repo: str | os.PathLike[str], subfolder: str | None = None, **hub_kwargs: Any
) -> None:
    """Refuses a config whose sizes cannot belong to the adapter file beside it, *before* anything is
    allocated: every rank that sizes the adapter's tensors (``config.allocated_ranks()``) must be at most the
    largest dimension of any tensor in ``adapter_model.safetensors`` (read from its header). A config with
    ``"r": 4000000`` next to a small file would otherwise allocate gigabytes before the shapes disagree.

    Raises:
        ValueError: naming the config field, its value and the file.
    """
    ranks = getattr(config, "allocated_ranks", None)
    if not callable(ranks):
        return
    found = _file_shapes(path_or_repo, subfolder, **hub_kwargs)
    if found is None:
        return
    path, shapes = found
    largest = max((max(shape) for shape in shapes.values() if shape), default=0)
    if largest == 0:
        return
    for name, value in ranks().items():
        if int(value) > largest:
            raise ValueError(
                f"the adapter config says {name}={value}, larger than any tensor dimension in {path} (largest: "
                f"{largest}); the config does not belong to these weights, refused before allocating anything"
            )


# ---- key mapping --------------------------------------------------------------------------------
def get_adapter_state_dict(tuner: AdapterModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_name`` under PEFT's saved key names (each layer's through the tuner's
    :meth:`~deltatune.tuner.AdapterModel.export_layer_tensors` hook, plus its ``extra_saved_tensors``)."""
    tuner.before_export(adapter_name)
    out: dict[str, torch.Tensor] = {}
    for name, layer in tuner.adapter_layers():
        if adapter_name not in layer.r:
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
    found = _owner(key, owners)
    if found is None:
        return None
    path, module = found
    rest = key[len(path) + 1 :]
    if isinstance(module, ModulesToSaveWrapper):
        if rest.startswith("original_module."):  # PEFT's bias="all" files hold these too
            return key
        rest = rest.removeprefix("modules_to_save.")
        return f"{path}.modules_to_save.{adapter_name}.{rest}"
    attr, _, tail = rest.partition(".")
    if attr in module.adapter_param_names:
        container = getattr(module, attr)
        if isinstance(container, torch.nn.ModuleDict):
            return f"{path}.{attr}.{adapter_name}.{tail}"
        return f"{path}.{attr}.{adapter_name}"
    return key  # e.g. "<path>.base_layer.bias"


def _raise_if_other_method(tuner: AdapterModel, adapter_name: str, keys: list[str]) -> None:
    """A clearer error when the tensors belong to another method than the config says."""
    config_type = str(tuner.peft_config[adapter_name].peft_type)
    own = {a for spec in specs_for_peft_type(config_type) for a in spec.layer_cls.adapter_param_names}
    for name in available_methods():
        spec = get_method(name)
        distinct = set(spec.layer_cls.adapter_param_names) - own
        if spec.peft_type == config_type or not distinct:
            continue
        if any(f".{a}" in k for k in keys for a in distinct):
            raise ValueError(
                f"the adapter config says peft_type={config_type} but its tensors look like {spec.peft_type} "
                f"({keys[0]}); the config and weights do not belong together"
            )


def _adapter_owned(target: str, owners: dict[str, Any], adapter_name: str, saved_extras: set[str]) -> bool:
    """Whether the in-memory key ``target`` is a tensor an adapter file may write: an adapter parameter of an
    adapter layer, this adapter's ``modules_to_save`` copy, or an extra tensor the method saves itself
    (e.g. the biases of LoRA's ``bias="all"``/``"lora_only"``)."""
    if target in saved_extras or f".modules_to_save.{adapter_name}." in f".{target}":
        return True
    found = _owner(target, owners)
    if found is None:
        return False
    path, module = found
    attr = target[len(path) + 1 :].split(".", 1)[0]
    return attr in getattr(module, "adapter_param_names", ())


def set_adapter_state_dict(
    tuner: AdapterModel,
    state_dict: Mapping[str, torch.Tensor],
    adapter_name: str,
    strict: bool = True,
    allow_base_weights: bool = False,
) -> list[str]:
    """Copies saved adapter tensors into ``adapter_name``; returns the keys that matched nothing.

    A key that would overwrite a frozen weight of the base model (``…base_layer.weight``,
    ``…original_module.*``: anything the method does not save itself) is refused, since ``disable_adapter()``
    and ``unload()`` could then no longer give the original model back; ``allow_base_weights=True`` loads
    such keys anyway (``strict=False`` alone skips them with a warning).

    Raises:
        ValueError: on a shape mismatch (naming the module and both shapes); with ``strict``, when keys
            match nothing in the model, would overwrite base weights, or adapter tensors are missing.
    """
    owners: dict[str, Any] = dict(tuner.adapter_layers())
    owners.update(dict(tuner.saved_module_wrappers()))
    params: dict[str, torch.Tensor] = dict(tuner.model.named_parameters())
    params.update(dict(tuner.model.named_buffers()))
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
        if not allow_base_weights and not _adapter_owned(target, owners, adapter_name, saved_extras):
            base_keys.append(saved_key)
            continue
        param = params[target]
        if tuple(param.shape) != tuple(tensor.shape):
            module = target.rsplit(".", 1)[0]
            raise ValueError(
                f"adapter tensor {saved_key} has shape {tuple(tensor.shape)} but {module} expects "
                f"{tuple(param.shape)}: the adapter was trained for a different base model or config"
            )
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
    if strict and missing:
        raise ValueError(f"the adapter file lacks {len(missing)} tensors, e.g. {missing[:3]}")
    if unexpected:
        logger.warning(
            "ignored %d adapter tensors that match nothing, e.g. %s", len(unexpected), unexpected[:3]
        )
    return unexpected
