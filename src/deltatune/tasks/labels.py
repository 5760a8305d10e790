"""An adapter's class names: its ``labels.json``, or for an adapter saved with PEFT's ``save_pretrained`` the
base model's label map, or transformers' ``LABEL_i`` names for the head saved with it."""

from __future__ import annotations

import logging
import os

from ..train.checkpoint import load_label_maps

__all__ = ["adapter_class_names"]

logger = logging.getLogger(__name__)


def _base_labels(base_id: str | None) -> dict[int, str] | None:
    """The ``id2label`` written in a base model's own ``config.json`` (not transformers' default
    ``LABEL_i`` pair), when it is a complete label map: ids 0..n-1, n >= 2, distinct names; else None."""
    if not base_id:
        return None
    from transformers import PretrainedConfig

    from ..vision import resolve_model_path

    try:
        raw, _ = PretrainedConfig.get_config_dict(resolve_model_path(base_id))
        labels = {int(k): str(v) for k, v in raw["id2label"].items()}
    except Exception:  # no readable label map there: the caller says what is missing
        return None
    complete = sorted(labels) == list(range(len(labels))) and len(set(labels.values())) == len(labels)
    return labels if complete and len(labels) >= 2 else None


def adapter_class_names(adapter_dir: str, base_id: str | None) -> dict[int, str]:
    """The adapter's class names: its ``labels.json`` (written by ``deltatune train``), or for an adapter
    saved otherwise (PEFT's ``save_pretrained``) the base model config's ``id2label`` when it is complete and
    fits the head saved with the adapter, or where the config names no classes, transformers' ``LABEL_i`` for
    each output of that head (either said in one line); else a one-line error naming what is missing."""
    from ..train.checkpoint import LABELS_NAME, saved_head_size

    if os.path.isfile(os.path.join(adapter_dir, LABELS_NAME)):
        return load_label_maps(adapter_dir)[0]
    head = saved_head_size(adapter_dir)
    labels = _base_labels(base_id)
    if labels is not None and head in (None, len(labels)):
        logger.warning(
            "%s has no %s: using the %d class names of the base model's config (%s)",
            adapter_dir,
            LABELS_NAME,
            len(labels),
            base_id,
        )
        return labels
    if labels is None and head is not None and head >= 2:
        logger.warning(
            "%s has no %s and the base model's config names no classes: the %d classes are called LABEL_0.."
            "LABEL_%d, as transformers calls them; write %s into the adapter folder to name them",
            adapter_dir,
            LABELS_NAME,
            head,
            head - 1,
            LABELS_NAME,
        )
        return {i: f"LABEL_{i}" for i in range(head)}
    found = (
        "its config names no complete id2label"
        if labels is None
        else f"its config names {len(labels)} labels"
    )
    size = f"the head saved with the adapter has {head} outputs; " if head is not None else ""
    raise FileNotFoundError(
        f"{adapter_dir} has no {LABELS_NAME} and the class names cannot be taken from the base model {base_id} "
        f"({size}{found}); write {LABELS_NAME} into the adapter folder: "
        '{"id2label": {"0": "name", "1": "name", ...}}'
    )
