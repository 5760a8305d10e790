"""``deltatune merge``: fold a trained adapter into its base model and write a standalone transformers model."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from typing import Any

import torch
from torch import nn

from .._files import (
    _tmp_prefix,
    apply_umask,
    atomic_write_text,
    build_directory,
    current_umask,
    remove_stale_temporaries,
)
from ..config import CONFIG_NAME
from ..serialization import check_finite
from ..train.checkpoint import LABELS_NAME, save_label_maps
from .report import write_merged_model_card

logger = logging.getLogger(__name__)

__all__ = ["check_merge_output", "merge_adapter"]


def _require_adapter_dir(adapter_dir: str) -> None:
    if not os.path.isdir(adapter_dir):
        raise FileNotFoundError(
            f"--adapter {adapter_dir!r} is not a directory; pass the output_dir of `deltatune train`"
        )
    if not os.path.isfile(os.path.join(adapter_dir, CONFIG_NAME)):
        unfinished = _unfinished_run(adapter_dir)
        raise FileNotFoundError(
            unfinished
            or f"{adapter_dir!r} has no {CONFIG_NAME}; pass --adapter the output_dir of `deltatune train`"
        )


def _unfinished_run(adapter_dir: str) -> str | None:
    """Why the output folder of a run that has not saved its adapter yet has none (still training, or stopped
    before the end), with what to do; None for a folder holding no unfinished run."""
    from ..train.lock import describe_holder, holder_alive, lock_holder
    from ..train.outputs import RUN_RECORD_NAME
    from ..train.resume import latest_complete_checkpoint

    record_path = os.path.join(adapter_dir, RUN_RECORD_NAME)
    try:
        with open(record_path, encoding="utf-8") as fh:
            status = json.load(fh).get("status")
    except (OSError, ValueError, AttributeError):
        return None
    if status == "finished":
        return None
    newest = latest_complete_checkpoint(adapter_dir)
    holder = lock_holder(adapter_dir)
    if holder and holder_alive(holder):
        then = f"or pass --adapter {newest!r} for its newest checkpoint" if newest else "(no checkpoint yet)"
        return (
            f"--adapter {adapter_dir!r} is a run still being trained ({describe_holder(holder)}); its adapter is "
            f"written when the run ends: wait for it {then}"
        )
    if newest is None:
        return (
            f"--adapter {adapter_dir!r} holds a run that stopped before saving anything; run the same "
            "`deltatune train` command again to train it"
        )
    return (
        f"--adapter {adapter_dir!r} holds a run that stopped before saving its adapter; continue it with the same "
        f"`deltatune train` command plus --resume_from_checkpoint true, or pass --adapter {newest!r} for its "
        "newest checkpoint"
    )


def _base_folders(adapter_dir: str, model: str | None) -> list[str]:
    """The real paths of the local base-model folders a merge of ``adapter_dir`` involves: ``--model`` and
    the adapter's recorded ``base_model_name_or_path`` (as loading resolves it: relative to the current
    folder, the bundled backbone's id to its installed copy); hub ids and missing folders are left out."""

    from ..vision import resolve_model_path

    names = [model] if model else []
    try:
        with open(os.path.join(adapter_dir, CONFIG_NAME), encoding="utf-8") as fh:
            recorded = json.load(fh).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):  # loading the adapter reports a broken config
        recorded = None
    if isinstance(recorded, str) and recorded:
        names.append(recorded)
    folders = [resolve_model_path(name) for name in names]
    return [os.path.realpath(folder) for folder in folders if os.path.isdir(folder)]


def check_merge_output(adapter_dir: str, output_dir: str, overwrite: bool, model: str | None = None) -> None:
    """Refuses a ``merge --output`` that would destroy its own input or another folder: the adapter folder
    itself, a folder inside it or around it, the base model's folder (``model`` or the one the adapter
    records) or a folder around it, a file, or a non-empty folder without ``overwrite``; and removes the
    temporary folders a killed merge left beside ``output_dir``.

    Raises:
        ValueError: naming ``--output`` and what to do.
    """
    _require_adapter_dir(adapter_dir)
    out, adapter = os.path.realpath(output_dir), os.path.realpath(adapter_dir)
    if out == adapter or out.startswith(adapter + os.sep):
        raise ValueError(
            f"--output {output_dir!r} is the adapter folder or inside it; a merged model there would be loaded "
            "with the adapter applied a second time. Choose a folder outside the adapter"
        )
    if adapter.startswith(out + os.sep):
        raise ValueError(
            f"--output {output_dir!r} contains the adapter folder; replacing it would delete the adapter"
        )
    for base in _base_folders(adapter_dir, model):
        if out == base or base.startswith(out + os.sep):
            raise ValueError(
                f"--output {output_dir!r} is the base model folder {base} (or contains it): replacing it would "
                "delete the base, and the adapter, loaded onto it later, would be applied a second time. "
                "Choose another --output"
            )
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output {output_dir!r} is a file; pass a directory for the merged model")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ValueError(f"--output {output_dir!r} is not empty; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(output_dir))
    removed = remove_stale_temporaries(parent, dead_writers_only=True, older_than_s=3600.0)
    if removed:
        logger.info("removed %d temporary folders a killed process left in %s", len(removed), parent)


@torch.no_grad()
def _check_forward(model: nn.Module, trained: Any) -> None:
    """One forward pass on a blank image: a merged model whose outputs are NaN/inf is refused."""
    from ..vision import resolve_size

    size = resolve_size(trained.image_processor)
    height, width = (size, size) if isinstance(size, int) else size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits = model(pixel_values=torch.zeros(1, 3, height, width, device=device)).logits.float()
    model.train(was_training)
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(
            f"merging {trained.directory} gives a model whose outputs are NaN/inf (its weights are finite but "
            "too large: check the scaling values in adapter_config.json); nothing was written"
        )


def merge_adapter(
    trained: Any, output_dir: str, overwrite: bool = True, base_model: str | None = None
) -> nn.Module:
    """Folds the adapter into the base weights and writes a standalone transformers model directory
    (``config.json`` with the label maps, safetensors weights, the evaluation ``preprocessor_config.json``
    that ``pipeline("image-classification")`` loads, ``labels.json``).

    The directory is built beside ``output_dir`` and moved in whole, so a kill leaves either the previous
    folder or the new one, never a mix; every file gets the umask's mode. With ``overwrite`` a previous
    folder is replaced; without, ``output_dir`` must be missing or empty when the build is moved in: of two
    merges into one new folder, the first to finish wins and the other is refused.

    Args:
        base_model: The base model ``trained`` was loaded onto when not its recorded one (``merge --model``),
            for the card.

    Returns:
        The merged model.

    Raises:
        ValueError: when a merged weight holds NaN/inf (naming it), or (without ``overwrite``) when another
            process filled ``output_dir`` meanwhile; nothing is written then.
    """
    merged = trained.model.merge_and_unload()
    check_finite(dict(merged.state_dict()), f"merging {trained.directory}")
    _check_forward(merged, trained)
    config = getattr(merged, "config", None)
    if config is not None:
        config.id2label = dict(trained.id2label)
        config.label2id = {v: k for k, v in trained.id2label.items()}
    if overwrite:
        with build_directory(output_dir) as build:
            _write_merged(build, merged, trained, base_model)
        return merged
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    build = tempfile.mkdtemp(prefix=_tmp_prefix(), dir=parent)
    try:
        _write_merged(build, merged, trained, base_model)
        _claim(build, output_dir)
    finally:
        if os.path.isdir(build):
            shutil.rmtree(build, ignore_errors=True)
    return merged


def _write_merged(build: str, merged: nn.Module, trained: Any, base_model: str | None) -> None:
    os.chmod(build, 0o777 & ~current_umask())
    merged.save_pretrained(build)  # type: ignore[operator]
    trained.image_processor.save_pretrained(build)
    labels = os.path.join(trained.directory, LABELS_NAME)
    if os.path.isfile(labels):
        with open(labels, encoding="utf-8") as fh:
            atomic_write_text(os.path.join(build, LABELS_NAME), fh.read())
    else:  # a PEFT-format adapter: the class names the merge used (see load_trained)
        save_label_maps(merged, build)
    write_merged_model_card(
        build, trained.directory, trained.model.peft_config, len(trained.id2label), base_model
    )
    apply_umask(build)  # safetensors creates its files 0600


def _claim(build: str, target: str) -> None:
    """Moves ``build`` to ``target`` unless ``target`` holds anything: an empty folder is removed first, and a
    rename never replaces a non-empty folder, so of two concurrent claims exactly one succeeds."""
    refused = ValueError(
        f"--output {target!r} was filled by another process while this merge ran; nothing was written "
        "(pass --overwrite to replace it)"
    )
    if os.path.lexists(target) and not os.path.isdir(target):
        raise refused
    if os.path.isdir(target):
        try:
            os.rmdir(target)
        except FileNotFoundError:
            pass
        except OSError:
            raise refused from None
    try:
        os.rename(build, target)
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise refused from None
        raise
