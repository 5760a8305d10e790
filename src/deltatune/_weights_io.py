"""Adapter weights files: safetensors (or a legacy ``.bin`` through ``torch.load(weights_only=True)``) read
and written, checked for integer/bool and non-finite values and for a config whose sizes cannot belong to the file. The key
layout inside them is :mod:`deltatune.serialization`'s."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from ._files import atomic_write_bytes, resolve_file

logger = logging.getLogger(__name__)

__all__ = [
    "SAFETENSORS_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "check_config_fits_file",
    "check_finite",
    "load_adapter_weights",
    "refuse_non_float_tensors",
    "save_adapter_weights",
]

SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"


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
        refuse_non_float_tensors(tensors, path)
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
    refuse_non_float_tensors(data, path)
    check_finite(data, path)
    return data


def refuse_non_float_tensors(tensors: Mapping[str, torch.Tensor], source: str | os.PathLike[str]) -> None:
    """Raises ``ValueError`` naming the first tensor of an adapter file whose dtype is integer or bool.

    Adapter weights are floating point; loading would silently cast such a tensor into a weight (a
    ``bool`` mask becomes 0/1 values, an integer its truncated numbers), so a file holding one is corrupt or
    not an adapter, whoever wrote it.
    """
    bad = [k for k, t in tensors.items() if not (t.is_floating_point() or t.is_complex())]
    if bad:
        raise ValueError(
            f"{os.fspath(source)}: adapter tensor {bad[0]!r} has dtype {str(tensors[bad[0]].dtype).removeprefix('torch.')}"
            f" ({len(bad)} such tensor(s)); adapter weights are floating point, so the file is corrupt or not an "
            "adapter"
        )


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
