"""Adapter-only checkpoints: what the Trainer writes into ``checkpoint-N`` and reads back to resume.

A checkpoint holds the adapter in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``,
loadable by ``PeftModel.from_pretrained`` and by ``peft``), the label maps (``labels.json``), and, for a
method whose tuner has resumable state beyond its PEFT files (AdaLoRA: the unpruned factors and the rank
allocator's EMAs and masks, since its PEFT file is sliced to the kept ranks), that state in the file the
tuner names (:attr:`~deltatune.tuner.AdapterModel.CHECKPOINT_STATE_FILE`).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any

from safetensors.torch import load_file, save_file

from .._files import atomic_path, read_json, write_json
from ..config import CONFIG_NAME, PeftConfig, TargetingConfig
from ..model import PeftModel
from ..serialization import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

logger = logging.getLogger(__name__)

__all__ = [
    "LABELS_NAME",
    "load_adapter_checkpoint",
    "load_label_maps",
    "save_label_maps",
    "save_tuner_state",
    "saved_head_size",
]

LABELS_NAME = "labels.json"


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
    write_json(os.path.join(directory, LABELS_NAME), maps, ensure_ascii=False)
    return maps


def saved_head_size(directory: str | os.PathLike[str]) -> int | None:
    """The number of outputs of the classification head saved with the adapter in ``directory`` (the first
    2-D ``<module>.weight`` of a ``modules_to_save`` entry in ``adapter_model.safetensors``), read from the
    file's header only; None when there is no such head or file."""
    from safetensors import safe_open

    path = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
    try:
        saved = read_json(os.path.join(directory, CONFIG_NAME), "adapter config")
        modules = saved.get("modules_to_save") if isinstance(saved, dict) else None
        if not isinstance(modules, list) or not os.path.isfile(path):
            return None
        with safe_open(path, "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                owner = key.removesuffix(".weight")
                if owner != key and any(owner.split(".")[-1] == str(m).split(".")[-1] for m in modules):
                    shape = fh.get_slice(key).get_shape()
                    if len(shape) == 2:
                        return int(shape[0])
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return None


def load_label_maps(
    directory: str | os.PathLike[str], num_labels: int | None = None
) -> tuple[dict[int, str], dict[str, int]]:
    """Reads ``labels.json`` back as ``(id2label, label2id)`` with integer ids, checked to be a usable label map:
    an object ``{"id2label": {"0": name, ...}}`` whose ids are exactly 0..n-1 (n ≥ 2) with distinct names.

    The file may come from anyone, so every check is linear in its size (a 100,000-label file is read in a
    fraction of a second), and when the classification head's size is known (``num_labels``) the number of
    labels is compared with it before anything else.

    Args:
        directory: The adapter (or checkpoint) folder holding ``labels.json``.
        num_labels: The number of outputs of the classification head the labels name; by default that of
            the head saved with the adapter in ``directory`` (:func:`saved_head_size`), if any.

    Raises:
        FileNotFoundError: when the directory has no ``labels.json``.
        ValueError: when the file is not a valid label map, naming the file and what is wrong.
    """
    path = os.path.join(directory, LABELS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: an adapter trained by deltatune stores its label maps there; pass the adapter "
            "directory written by `deltatune train`"
        )
    expected = 'expected {"id2label": {"0": "name", "1": "name", ...}} with ids 0..n-1'
    if num_labels is None:  # the head saved with the adapter, when there is one
        num_labels = saved_head_size(directory)
    data = read_json(path, "label map")
    raw = data.get("id2label") if isinstance(data, dict) else None
    if not isinstance(raw, dict):
        got = type(raw).__name__ if isinstance(data, dict) and "id2label" in data else "no id2label object"
        raise ValueError(f"{path} is not a valid label map (id2label: {got}); {expected}")
    if num_labels is not None and len(raw) != num_labels:
        raise ValueError(
            f"{path} names {len(raw)} labels but the model's classification head has {num_labels} outputs; "
            "the labels and the adapter do not belong together"
        )
    id2label: dict[int, str] = {}
    for key, name in raw.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: label id {key!r} is not an integer; {expected}") from None
        if not isinstance(name, str | int | float) or isinstance(name, bool):
            raise ValueError(f"{path}: the name of label {key!r} is {type(name).__name__}, not a string")
        id2label[index] = str(name)
    ids = sorted(id2label)
    if ids != list(range(len(ids))):
        odd = [i for i in ids if not 0 <= i < len(ids)][:5]
        raise ValueError(
            f"{path}: label ids must be 0..{len(ids) - 1} with none missing (they index the model's outputs), "
            f"got {ids[:10]}{'...' if len(ids) > 10 else ''} (out of place: {odd})"
        )
    if len(ids) < 2:
        raise ValueError(f"{path}: a classifier needs at least 2 labels, found {len(ids)}")
    duplicates = sorted(name for name, count in Counter(id2label.values()).items() if count > 1)
    if duplicates:
        raise ValueError(f"{path}: label names must be distinct, repeated: {duplicates[:5]}")
    return dict(sorted(id2label.items())), {v: k for k, v in sorted(id2label.items())}


# ---- a method's resumable state ------------------------------------------------------------------
def save_tuner_state(model: PeftModel, directory: str | os.PathLike[str]) -> str | None:
    """Writes the tuner's :meth:`~deltatune.tuner.AdapterModel.checkpoint_state` (atomically) into its
    :attr:`~deltatune.tuner.AdapterModel.CHECKPOINT_STATE_FILE`; returns the path, or None when the
    method keeps no such state."""
    tuner = model.base_model
    name = tuner.CHECKPOINT_STATE_FILE
    if name is None:
        return None
    tensors = tuner.checkpoint_state()
    path = os.path.join(directory, name)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", "written_by": "deltatune"})
    return path


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
    tuner = model.base_model
    state_file = tuner.CHECKPOINT_STATE_FILE
    if state_file is None:
        model.load_adapter(directory, model.active_adapter, is_trainable=True)
    else:
        path = os.path.join(directory, state_file)
        if not os.path.isfile(path):
            raise ValueError(
                f"{directory} has no {state_file}: a {model.peft_type} run can only resume from checkpoints "
                "written by deltatune's Trainer (its PEFT files alone do not hold the whole training state)"
            )
        saved = PeftConfig.from_pretrained(directory)
        if not isinstance(saved, TargetingConfig):
            raise ValueError(f"{directory}/{CONFIG_NAME} is not an adapter config")
        tuner.load_checkpoint_state(load_file(path), saved)
    logger.debug("restored adapter %r from %s", model.active_adapter, directory)
