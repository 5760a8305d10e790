"""Adapter-only checkpoints: what the Trainer writes into ``checkpoint-N`` and reads back to resume.

A checkpoint holds the adapter in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``,
loadable by ``PeftModel.from_pretrained`` and by ``peft``), the label maps (``labels.json``), and, for
AdaLoRA only, ``adalora_state.safetensors``: the unpruned factors and the rank allocator's EMAs and
masks. The PEFT file of a pruned AdaLoRA adapter is sliced to its kept ranks, which is right for
inference but loses what exact resumption needs; the extra file keeps it.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..config import CONFIG_NAME, PeftConfig
from ..model import PeftModel
from ..serialization import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "ADALORA_STATE_NAME",
    "LABELS_NAME",
    "is_adalora",
    "load_adapter_checkpoint",
    "load_label_maps",
    "save_adalora_state",
    "save_label_maps",
]

LABELS_NAME = "labels.json"
ADALORA_STATE_NAME = "adalora_state.safetensors"


def is_adalora(model: Any) -> bool:
    """True when ``model`` is a deltatune PeftModel whose active adapter is AdaLoRA."""
    return isinstance(model, PeftModel) and model.peft_type == "ADALORA"


# ---- label maps ---------------------------------------------------------------------------------
def save_label_maps(model: Any, directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Writes ``labels.json`` (``{"id2label": {...}, "label2id": {...}}``) from the model's config.

    Returns the written maps, or None when the model has no transformers config.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    config = getattr(base, "config", None)
    id2label = getattr(config, "id2label", None)
    if not id2label:
        return None
    maps = {
        "id2label": {str(int(k)): str(v) for k, v in id2label.items()},
        "label2id": {str(v): int(k) for k, v in id2label.items()},
    }
    os.makedirs(directory, exist_ok=True)
    atomic_write_text(os.path.join(directory, LABELS_NAME), json.dumps(maps, indent=2, ensure_ascii=False))
    return maps


def load_label_maps(directory: str | os.PathLike[str]) -> tuple[dict[int, str], dict[str, int]]:
    """Reads ``labels.json`` back as ``(id2label, label2id)`` with integer ids.

    Raises:
        FileNotFoundError: when the directory has no ``labels.json``.
        ValueError: when the file is not valid.
    """
    path = os.path.join(directory, LABELS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: an adapter trained by deltatune stores its label maps there; pass the adapter "
            "directory written by `deltatune train`"
        )
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        id2label = {int(k): str(v) for k, v in data["id2label"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{path} is not a valid label map ({err}); expected {{'id2label': {{id: name}}}}"
        ) from err
    return id2label, {v: k for k, v in id2label.items()}


# ---- AdaLoRA trainer state ----------------------------------------------------------------------
def save_adalora_state(model: PeftModel, directory: str | os.PathLike[str]) -> None:
    """Writes the unpruned trainable tensors and the allocator state of an AdaLoRA model.

    Keys: ``param:<in-memory parameter name>`` for every trainable parameter, ``ipt:<i>``/``unc:<i>``
    for the importance EMAs (one per factor, in allocator order) and ``mask:<i>`` (uint8, one per layer).
    """
    tuner = model.base_model
    tensors: dict[str, torch.Tensor] = {
        f"param:{name}": p.detach().contiguous().cpu()
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    allocator = tuner.rank_allocator
    for kind in ("ipt", "unc"):
        for i, t in enumerate(getattr(allocator, kind) or []):
            tensors[f"{kind}:{i}"] = t.detach().contiguous().cpu()
    for i, mask in enumerate(allocator.masks or []):
        tensors[f"mask:{i}"] = mask.to(torch.uint8).cpu()
    path = os.path.join(directory, ADALORA_STATE_NAME)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt", "written_by": "deltatune"})
    os.replace(tmp, path)


def _load_adalora_state(model: PeftModel, directory: str | os.PathLike[str]) -> None:
    tensors = load_file(os.path.join(directory, ADALORA_STATE_NAME))
    params = dict(model.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    saved = {k[len("param:") :] for k in tensors if k.startswith("param:")}
    if saved != expected:
        missing, extra = sorted(expected - saved)[:3], sorted(saved - expected)[:3]
        raise ValueError(
            f"{directory} holds AdaLoRA state for a different adapter layout (missing {missing}, unexpected "
            f"{extra}); resume with the same model and adapter config"
        )
    with torch.no_grad():
        for name in saved:
            target, value = params[name], tensors[f"param:{name}"]
            if target.shape != value.shape:
                raise ValueError(
                    f"{name}: checkpoint shape {tuple(value.shape)} but the model has {tuple(target.shape)}; "
                    "resume with the same adapter config (init_r)"
                )
            target.copy_(value.to(dtype=target.dtype, device=target.device))
    tuner = model.base_model
    allocator = tuner.rank_allocator
    device = next(iter(params.values())).device

    def _series(kind: str) -> list[torch.Tensor] | None:
        items = sorted((int(k.split(":")[1]), v) for k, v in tensors.items() if k.startswith(f"{kind}:"))
        return [v.to(device) for _, v in items] or None

    allocator.ipt, allocator.unc = _series("ipt"), _series("unc")
    masks = _series("mask")
    allocator.masks = [m.bool() for m in masks] if masks else None
    config = PeftConfig.from_json_file(os.path.join(directory, CONFIG_NAME))
    model.peft_config[model.active_adapter].rank_pattern = getattr(config, "rank_pattern", None)


# ---- loading a checkpoint back ------------------------------------------------------------------
def load_adapter_checkpoint(model: PeftModel, directory: str | os.PathLike[str]) -> None:
    """Restores the active adapter (trainable) from a checkpoint written by :class:`DeltaTrainer`.

    Raises:
        ValueError: when ``directory`` holds no adapter, naming the files it expected.
    """
    directory = os.fspath(directory)
    has_weights = any(
        os.path.isfile(os.path.join(directory, n)) for n in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)
    )
    if not os.path.isdir(directory) or not has_weights:
        raise ValueError(
            f"{directory} is not an adapter checkpoint: expected {CONFIG_NAME} and {SAFETENSORS_WEIGHTS_NAME} "
            "(written by deltatune's Trainer in checkpoint-N folders)"
        )
    if is_adalora(model):
        if not os.path.isfile(os.path.join(directory, ADALORA_STATE_NAME)):
            raise ValueError(
                f"{directory} has no {ADALORA_STATE_NAME}: an AdaLoRA run can only resume from checkpoints written "
                "by deltatune's Trainer (the PEFT file alone is pruned to the kept ranks)"
            )
        _load_adalora_state(model, directory)
    else:
        model.load_adapter(directory, model.active_adapter, is_trainable=True)
    logger.info("restored adapter %r from %s", model.active_adapter, directory)
