"""Adapter files: PEFT's key layout, safetensors I/O, atomic writes and hub resolution — in one place.

In memory an adapter tensor is ``base_model.model.<module>.<tensor>.<adapter>[.<rest>]`` (PEFT's
layout); on disk the adapter name is dropped (``…q_proj.lora_A.weight``, ``…q_proj.hada_w1_a``) and a
``modules_to_save`` copy is stored under the plain module path (``…classifier.weight``). Keys saved
against transformers 4.x module names are renamed with the model's own conversion rules on load.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .layers import AdapterLayer, ModulesToSaveWrapper

if TYPE_CHECKING:
    from .inject import AdapterModel

logger = logging.getLogger(__name__)

__all__ = [
    "SAFETENSORS_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "atomic_write_bytes",
    "atomic_write_text",
    "get_adapter_state_dict",
    "load_adapter_weights",
    "resolve_file",
    "save_adapter_weights",
    "set_adapter_state_dict",
]

PREFIX = "base_model.model."
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"


# ---- atomic files -------------------------------------------------------------------------------
def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path``, fsyncs it, then renames it over ``path``.

    A crash at any point leaves either the old file or the new one, never a torn file.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


# ---- locating files -----------------------------------------------------------------------------
def resolve_file(
    path_or_repo: str | os.PathLike[str], filename: str, subfolder: str | None = None, **hub_kwargs: Any
) -> str:
    """Returns a local path to ``filename`` in a directory, or downloads it from a Hub repo id.

    Raises:
        FileNotFoundError: if a local directory lacks the file, or the hub has no such repo/file (the
            message says which, and that a network is needed for hub ids).
    """
    base = os.fspath(path_or_repo)
    local_dir = os.path.join(base, subfolder) if subfolder else base
    if os.path.isdir(local_dir):
        path = os.path.join(local_dir, filename)
        if not os.path.isfile(path):
            present = sorted(os.listdir(local_dir))[:10]
            raise FileNotFoundError(f"{filename} not found in {local_dir} (it contains: {present})")
        return path
    if os.path.exists(base) or base.startswith((".", "/")) or os.sep in base.strip("/").replace("/", "", 1):
        raise FileNotFoundError(f"{base} is not a directory holding {filename}")
    try:
        from huggingface_hub import hf_hub_download

        allowed = {"revision", "cache_dir", "token", "force_download", "local_files_only"}
        kwargs = {k: v for k, v in hub_kwargs.items() if k in allowed and v is not None}
        return hf_hub_download(base, filename, subfolder=subfolder, **kwargs)
    except Exception as err:
        raise FileNotFoundError(
            f"could not get {filename} from {base!r}: not a local directory, and the Hugging Face Hub did not "
            f"provide it ({type(err).__name__}: {err}). Pass a local adapter directory, or check the repo id "
            "and your network"
        ) from err


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
            return load_file(path, device=device)
        except Exception as err:
            raise ValueError(
                f"{path} is not a readable safetensors file (truncated or corrupt?): {err}"
            ) from err
    try:
        data = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise ValueError(
            f"refusing to load {path}: it is not a plain tensor checkpoint loadable with weights_only=True "
            f"({type(err).__name__}). deltatune never unpickles arbitrary objects; convert it to safetensors"
        ) from err
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path} does not hold a dict of tensors")
    return data


# ---- key mapping --------------------------------------------------------------------------------
def _layer_export(layer: AdapterLayer, adapter_name: str, keep: list[bool] | None) -> dict[str, torch.Tensor]:
    export = getattr(layer, "export_tensors", None)
    if export is not None:
        mask = torch.tensor(keep, dtype=torch.bool) if keep is not None else None
        return export(adapter_name, mask)
    out: dict[str, torch.Tensor] = {}
    for attr in layer.adapter_param_names:
        container = getattr(layer, attr)
        if adapter_name not in container:
            continue
        item = container[adapter_name]
        if isinstance(item, torch.nn.Module):
            for k, v in item.state_dict().items():
                out[f"{attr}.{k}"] = v
        else:
            out[attr] = item.detach()
    return out


def get_adapter_state_dict(tuner: AdapterModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_name`` under PEFT's saved key names (AdaLoRA sliced to its ranks)."""
    config = tuner.peft_config[adapter_name]
    rank_pattern = None
    current = getattr(tuner, "current_rank_pattern", None)
    if current is not None:
        rank_pattern = current(adapter_name)
    out: dict[str, torch.Tensor] = {}
    for name, layer in tuner.adapter_layers():
        if adapter_name not in layer.r:
            continue
        keep = None
        if rank_pattern:
            keep = next(
                (
                    rank_pattern[f"{v}.lora_E"]
                    for v in tuner.name_variants(name)
                    if f"{v}.lora_E" in rank_pattern
                ),
                None,
            )
        for key, tensor in _layer_export(layer, adapter_name, keep).items():
            out[f"{PREFIX}{name}.{key}"] = tensor
    for name, wrapper in tuner.saved_module_wrappers():
        if adapter_name in wrapper.modules_to_save:
            for key, tensor in wrapper.modules_to_save[adapter_name].state_dict().items():
                out[f"{PREFIX}{name}.{key}"] = tensor
    bias = getattr(config, "bias", "none")
    if bias == "all":
        out.update(_all_bias_tensors(tuner, adapter_name))
    elif bias == "lora_only":
        for name, layer in tuner.adapter_layers():
            layer_bias = layer.base_bias
            if adapter_name in layer.r and layer_bias is not None:
                out[f"{PREFIX}{name}.base_layer.bias"] = layer_bias.detach()
    return out


def _all_bias_tensors(tuner: AdapterModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """``bias="all"``: every state-dict key containing ``bias``, as PEFT selects them.

    PEFT's sweep also picks up the biases inside ``modules_to_save`` wrappers and writes them as
    ``<module>.original_module.bias`` and ``<module>.modules_to_save.bias`` (besides ``<module>.bias``);
    they are written here too so that both libraries produce the same key set.
    """
    skip = tuple(
        f"{name}.{attr}."
        for name, layer in tuner.adapter_layers()
        for attr in (*layer.adapter_param_names, *layer.other_param_names)
    )
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tuner.model.state_dict().items():
        if "bias" not in key or key.startswith(skip):
            continue
        if ".modules_to_save." in key:
            marker = f".modules_to_save.{adapter_name}."
            if marker not in key:
                continue  # another adapter's copy
            key = key.replace(marker, ".modules_to_save.")
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
    from .registry import available_methods, get_method, method_for_peft_type

    config_type = tuner.peft_config[adapter_name].peft_type
    own = set(method_for_peft_type(str(config_type)).layer_cls.adapter_param_names)
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


def set_adapter_state_dict(
    tuner: AdapterModel, state_dict: Mapping[str, torch.Tensor], adapter_name: str, strict: bool = True
) -> list[str]:
    """Copies saved adapter tensors into ``adapter_name``; returns the keys that matched nothing.

    Raises:
        ValueError: on a shape mismatch (naming the module and both shapes); with ``strict``, when keys
            match nothing in the model or adapter tensors are missing from the file.
    """
    owners: dict[str, Any] = dict(tuner.adapter_layers())
    owners.update(dict(tuner.saved_module_wrappers()))
    params: dict[str, torch.Tensor] = dict(tuner.model.named_parameters())
    params.update(dict(tuner.model.named_buffers()))
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
