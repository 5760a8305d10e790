"""Using a trained adapter directory: load it, predict images, evaluate a split, merge into a plain model."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._files import apply_umask, atomic_write_text, build_directory, read_json, remove_stale_temporaries
from ..config import CONFIG_NAME, PeftConfig
from ..model import PeftModel
from ..serialization import check_finite
from ..train.checkpoint import LABELS_NAME, load_label_maps
from ..train.metrics import ClassificationReport, classification_report
from ..train.outputs import RUN_RECORD_NAME
from .classifier import build_base_model
from .report import write_merged_model_card

logger = logging.getLogger(__name__)

__all__ = [
    "TrainedAdapter",
    "check_merge_output",
    "collect_images",
    "evaluate_adapter",
    "load_trained",
    "merge_adapter",
    "predict_images",
]


@dataclass
class TrainedAdapter:
    """A loaded adapter ready for inference.

    Attributes:
        model: The PeftModel in eval mode.
        image_processor: The processor saved with the adapter (or the base model's).
        id2label: Class id → name.
        record: The run record (``deltatune_run.json``), empty when absent.
        directory: The adapter directory.
    """

    model: PeftModel
    image_processor: Any
    id2label: dict[int, str]
    record: dict[str, Any]
    directory: str


def _require_adapter_dir(adapter_dir: str) -> None:
    if not os.path.isdir(adapter_dir):
        raise FileNotFoundError(
            f"--adapter {adapter_dir!r} is not a directory; pass the output_dir of `deltatune train`"
        )
    if not os.path.isfile(os.path.join(adapter_dir, CONFIG_NAME)):
        raise FileNotFoundError(
            f"{adapter_dir!r} has no {CONFIG_NAME}; pass --adapter the output_dir of `deltatune train`"
        )


def load_trained(
    adapter_dir: str, model: str | None = None, trust_remote_code: bool = False
) -> TrainedAdapter:
    """Loads the adapter written by ``deltatune train`` onto its base model.

    Args:
        adapter_dir: Directory with ``adapter_config.json``, the weights and ``labels.json``.
        model: Base model id or directory; default: ``base_model_name_or_path`` from the adapter config.
        trust_remote_code: Let the base model's or the adapter's processor folder run the Python code it
            ships; never otherwise (``trust_remote_code=False`` is passed explicitly).

    Raises:
        FileNotFoundError: when the directory, its files or the recorded base model are missing.
        ValueError: when no base model is known, or a file is invalid, unsafe or does not fit the model.
    """
    from transformers import AutoImageProcessor

    from ..vision.limits import check_image_processor

    _require_adapter_dir(adapter_dir)
    config = PeftConfig.from_pretrained(adapter_dir)
    id2label, _ = load_label_maps(adapter_dir)
    record: dict[str, Any] = {}
    record_path = os.path.join(adapter_dir, RUN_RECORD_NAME)
    if os.path.isfile(record_path):
        loaded = read_json(record_path, "run record")
        record = loaded if isinstance(loaded, dict) else {}
    base_id = model or config.base_model_name_or_path
    if not base_id:
        raise ValueError(f"{adapter_dir}/{CONFIG_NAME} names no base_model_name_or_path; pass --model")
    if model is None and os.path.isabs(base_id) and not os.path.exists(base_id):
        from ..vision import resolve_model_path

        if resolve_model_path(base_id) == base_id:  # not the bundled backbone installed elsewhere
            raise FileNotFoundError(
                f"the adapter's base model {base_id!r} (base_model_name_or_path in {adapter_dir}/{CONFIG_NAME}) "
                "does not exist on this machine (was the adapter copied from another one?); pass --model with "
                "the base model's folder or hub id"
            )
    seed = int(record.get("seed", 42))
    random_backbone = bool(record.get("random_backbone"))
    if random_backbone:
        logger.warning(
            "%s was trained on a randomly initialised backbone (a baseline run): its base model is rebuilt "
            "with the same random weights (seed %d), not loaded from %s",
            adapter_dir,
            seed,
            base_id,
        )
    # the bundled backbone's id (or an install path from another machine) resolves to the installed copy;
    # the head is the trained one, restored from the adapter next
    base, processor = build_base_model(
        base_id, id2label, random_backbone, seed, trained_head=True, trust_remote_code=trust_remote_code
    )
    peft_model = PeftModel.from_pretrained(base, adapter_dir)
    processor_file = os.path.join(adapter_dir, "preprocessor_config.json")
    if os.path.isfile(processor_file):
        try:
            processor = AutoImageProcessor.from_pretrained(
                adapter_dir, trust_remote_code=bool(trust_remote_code)
            )
        except PermissionError:
            raise
        except (OSError, ValueError, RecursionError) as err:
            reason = " ".join(str(err).split())
            if "trust_remote_code" in reason or "custom code" in reason:
                raise ValueError(
                    f"{processor_file} asks to run the Python code the folder ships (auto_map); deltatune does not "
                    "run it unless you pass --trust_remote_code (only for folders you trust)"
                ) from err
            raise ValueError(f"cannot load the image processor {processor_file}: {reason[:400]}") from err
        check_image_processor(processor, processor_file)
    peft_model.eval()
    return TrainedAdapter(peft_model, processor, id2label, record, adapter_dir)


def collect_images(paths: Sequence[str]) -> list[str]:
    """Expands files and directories (recursively) into a sorted list of image files.

    Raises:
        FileNotFoundError: for a path that does not exist, or when nothing is found.
    """
    from ..vision import IMAGE_EXTENSIONS

    found: list[str] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found += sorted(
                str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
        elif path.is_file():
            found.append(str(path))
        else:
            raise FileNotFoundError(f"{raw!r} is neither an image file nor a directory")
    if not found:
        raise FileNotFoundError(
            f"no images found in {list(paths)} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return found


def _batches(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _check_logits(logits: torch.Tensor, names: Sequence[str], trained: TrainedAdapter) -> None:
    """Raises ``ValueError`` naming the first input whose scores are NaN/inf (a broken adapter or processor)."""
    finite = torch.isfinite(logits).all(dim=-1)
    if bool(finite.all()):
        return
    first = names[int((~finite).nonzero()[0, 0])]
    raise ValueError(
        f"the model produced NaN/inf scores for {first}: the adapter in {trained.directory} (its weights, or a "
        "scaling value in adapter_config.json) or its image processor (image_std) is broken; nothing was predicted"
    )


@torch.no_grad()
def predict_images(
    trained: TrainedAdapter,
    images: Sequence[str],
    top_k: int = 5,
    batch_size: int = 32,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Top-k labels with probabilities for each image, preprocessed exactly as transformers' pipeline does.

    An image that cannot be read (truncated, not an image, too many pixels) is skipped with a counted
    warning and listed with an ``"error"`` and no predictions; the others are predicted.

    Returns:
        ``[{"image": path, "predictions": [{"label": name, "score": p}, ...]}, ...]`` (scores descending), and
        ``{"image": path, "predictions": [], "error": reason}`` for a skipped image.

    Raises:
        ValueError: for a non-positive ``batch_size``/``top_k``, when no image at all could be read, or when
            the model's scores are NaN/inf.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from ..vision import to_rgb
    from ..vision.limits import check_image_pixels

    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    k = min(top_k, len(trained.id2label))
    results: list[dict[str, Any]] = []
    skipped = 0
    device = next(trained.model.parameters()).device
    bar = tqdm(
        total=len(images), desc="predict", unit="img", disable=not progress or len(images) <= batch_size
    )
    for chunk in _batches(list(images), batch_size):
        loaded, names = [], []
        for path in chunk:
            try:
                with Image.open(path) as img:
                    check_image_pixels(img, path)
                    loaded.append(to_rgb(img).copy())
                names.append(path)
            except Exception as err:  # any decoding failure: PIL raises OSError, SyntaxError, ValueError...
                skipped += 1
                reason = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
                logger.warning("skipped unreadable image %s (%s); %d skipped so far", path, reason, skipped)
                results.append({"image": path, "predictions": [], "error": reason})
        bar.update(len(chunk))
        if not loaded:
            continue
        inputs = trained.image_processor(loaded, return_tensors="pt")
        logits = trained.model(pixel_values=inputs["pixel_values"].to(device)).logits.float()
        _check_logits(logits, names, trained)
        scores, ids = logits.softmax(dim=-1).topk(k, dim=-1)
        for path, row_scores, row_ids in zip(names, scores.tolist(), ids.tolist(), strict=True):
            preds = [
                {"label": trained.id2label[i], "score": s} for i, s in zip(row_ids, row_scores, strict=True)
            ]
            results.append({"image": path, "predictions": preds})
    bar.close()
    if skipped == len(images):
        raise ValueError(f"none of the {len(images)} images could be read (see the warnings above)")
    if skipped:
        logger.warning("skipped %d of %d images that could not be read", skipped, len(images))
    order = {path: i for i, path in enumerate(images)}
    return sorted(results, key=lambda r: order.get(r["image"], 0))


@torch.no_grad()
def evaluate_adapter(
    trained: TrainedAdapter, dataset: Any, batch_size: int = 64, progress: bool = True
) -> ClassificationReport:
    """Accuracy, top-5, per-class accuracy and the confusion matrix of ``dataset`` (rows ``{"image", "label"}``).

    Raises:
        ValueError: when the model's scores are NaN/inf.
    """
    from tqdm.auto import tqdm

    from ..vision import TransformedDataset, build_transforms, collate_fn

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    data = TransformedDataset(dataset, build_transforms(trained.image_processor, train=False))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate_fn)
    device = next(trained.model.parameters()).device
    all_logits, all_labels = [], []
    for number, batch in enumerate(tqdm(loader, desc="evaluate", unit="batch", disable=not progress)):
        logits = trained.model(pixel_values=batch["pixel_values"].to(device)).logits.float().cpu()
        _check_logits(logits, [f"evaluation batch {number}"] * len(logits), trained)
        all_logits.append(logits)
        all_labels.append(batch["labels"])
    logits = torch.cat(all_logits).numpy()
    labels = torch.cat(all_labels).numpy().astype(np.int64)
    names = [trained.id2label[i] for i in range(len(trained.id2label))]
    return classification_report(logits, labels, names)


def check_merge_output(adapter_dir: str, output_dir: str, overwrite: bool) -> None:
    """Refuses a ``merge --output`` that would destroy its own input or another folder: the adapter folder
    itself, a folder inside it or around it, a file, or a non-empty folder without ``overwrite``; and removes
    the temporary folders a killed merge left beside ``output_dir``.

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
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output {output_dir!r} is a file; pass a directory for the merged model")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ValueError(f"--output {output_dir!r} is not empty; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(output_dir))
    removed = remove_stale_temporaries(parent, dead_writers_only=True, older_than_s=3600.0)
    if removed:
        logger.info("removed %d temporary folders a killed process left in %s", len(removed), parent)


@torch.no_grad()
def _check_forward(model: nn.Module, trained: TrainedAdapter) -> None:
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


def merge_adapter(trained: TrainedAdapter, output_dir: str) -> nn.Module:
    """Folds the adapter into the base weights and writes a standalone transformers model directory
    (``config.json`` with the label maps, safetensors weights, ``preprocessor_config.json``, ``labels.json``).

    The directory is built beside ``output_dir`` and swapped in whole, so a kill leaves either the previous
    folder or the new one, never a mix; every file gets the umask's mode.

    Returns:
        The merged model.

    Raises:
        ValueError: when a merged weight holds NaN/inf (naming it); nothing is written then.
    """
    merged = trained.model.merge_and_unload()
    check_finite(dict(merged.state_dict()), f"merging {trained.directory}")
    _check_forward(merged, trained)
    config = getattr(merged, "config", None)
    if config is not None:
        config.id2label = dict(trained.id2label)
        config.label2id = {v: k for k, v in trained.id2label.items()}
    with build_directory(output_dir) as build:
        merged.save_pretrained(build)  # type: ignore[operator]
        trained.image_processor.save_pretrained(build)
        with open(os.path.join(trained.directory, LABELS_NAME), encoding="utf-8") as fh:
            atomic_write_text(os.path.join(build, LABELS_NAME), fh.read())
        write_merged_model_card(build, trained.directory, trained.model.peft_config, len(trained.id2label))
        apply_umask(build)  # safetensors creates its files 0600
    return merged
