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

from .._files import atomic_write_text, read_json
from ..config import CONFIG_NAME, PeftConfig
from ..model import PeftModel
from ..train.checkpoint import LABELS_NAME, load_label_maps
from ..train.metrics import ClassificationReport, classification_report
from ..train.outputs import RUN_RECORD_NAME
from .classifier import build_base_model
from .report import write_merged_model_card

logger = logging.getLogger(__name__)

__all__ = [
    "TrainedAdapter",
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


def load_trained(adapter_dir: str, model: str | None = None) -> TrainedAdapter:
    """Loads the adapter written by ``deltatune train`` onto its base model.

    Args:
        adapter_dir: Directory with ``adapter_config.json``, the weights and ``labels.json``.
        model: Base model id or directory; default: ``base_model_name_or_path`` from the adapter config.

    Raises:
        FileNotFoundError: when the directory or its files are missing.
        ValueError: when no base model is known.
    """
    from transformers import AutoImageProcessor

    if not os.path.isfile(os.path.join(adapter_dir, CONFIG_NAME)):
        raise FileNotFoundError(
            f"{adapter_dir!r} has no {CONFIG_NAME}; pass --adapter the output_dir of `deltatune train`"
        )
    config = PeftConfig.from_pretrained(adapter_dir)
    id2label, _ = load_label_maps(adapter_dir)
    record: dict[str, Any] = {}
    record_path = os.path.join(adapter_dir, RUN_RECORD_NAME)
    if os.path.isfile(record_path):
        record = read_json(record_path, "run record")
    base_id = model or config.base_model_name_or_path
    if not base_id:
        raise ValueError(f"{adapter_dir}/{CONFIG_NAME} names no base_model_name_or_path; pass --model")
    seed = int(record.get("seed", 42))
    # the bundled backbone's id (or an install path from another machine) resolves to the installed copy;
    # the head is the trained one, restored from the adapter next
    base, processor = build_base_model(
        base_id, id2label, bool(record.get("random_backbone")), seed, trained_head=True
    )
    peft_model = PeftModel.from_pretrained(base, adapter_dir)
    if os.path.isfile(os.path.join(adapter_dir, "preprocessor_config.json")):
        processor = AutoImageProcessor.from_pretrained(adapter_dir)
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


@torch.no_grad()
def predict_images(
    trained: TrainedAdapter,
    images: Sequence[str],
    top_k: int = 5,
    batch_size: int = 32,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Top-k labels with probabilities for each image, preprocessed exactly as transformers' pipeline does.

    Returns:
        ``[{"image": path, "predictions": [{"label": name, "score": p}, ...]}, ...]`` (scores descending).
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from ..vision import to_rgb

    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    k = min(top_k, len(trained.id2label))
    results: list[dict[str, Any]] = []
    device = next(trained.model.parameters()).device
    bar = tqdm(
        total=len(images), desc="predict", unit="img", disable=not progress or len(images) <= batch_size
    )
    for chunk in _batches(list(images), batch_size):
        loaded = []
        for path in chunk:
            with Image.open(path) as img:
                loaded.append(to_rgb(img).copy())
        inputs = trained.image_processor(loaded, return_tensors="pt")
        logits = trained.model(pixel_values=inputs["pixel_values"].to(device)).logits
        probs = logits.float().softmax(dim=-1)
        scores, ids = probs.topk(k, dim=-1)
        for path, row_scores, row_ids in zip(chunk, scores.tolist(), ids.tolist(), strict=True):
            preds = [
                {"label": trained.id2label[i], "score": s} for i, s in zip(row_ids, row_scores, strict=True)
            ]
            results.append({"image": path, "predictions": preds})
        bar.update(len(chunk))
    bar.close()
    return results


@torch.no_grad()
def evaluate_adapter(
    trained: TrainedAdapter, dataset: Any, batch_size: int = 64, progress: bool = True
) -> ClassificationReport:
    """Accuracy, top-5, per-class accuracy and the confusion matrix of ``dataset`` (rows ``{"image", "label"}``)."""
    from tqdm.auto import tqdm

    from ..vision import TransformedDataset, build_transforms, collate_fn

    data = TransformedDataset(dataset, build_transforms(trained.image_processor, train=False))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate_fn)
    device = next(trained.model.parameters()).device
    all_logits, all_labels = [], []
    for batch in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
        all_logits.append(trained.model(pixel_values=batch["pixel_values"].to(device)).logits.float().cpu())
        all_labels.append(batch["labels"])
    logits = torch.cat(all_logits).numpy()
    labels = torch.cat(all_labels).numpy().astype(np.int64)
    names = [trained.id2label[i] for i in range(len(trained.id2label))]
    return classification_report(logits, labels, names)


def merge_adapter(trained: TrainedAdapter, output_dir: str) -> nn.Module:
    """Folds the adapter into the base weights and writes a standalone transformers model directory
    (``config.json`` with the label maps, safetensors weights, ``preprocessor_config.json``, ``labels.json``).

    Returns:
        The merged model.
    """
    merged = trained.model.merge_and_unload()
    config = getattr(merged, "config", None)
    if config is not None:
        config.id2label = dict(trained.id2label)
        config.label2id = {v: k for k, v in trained.id2label.items()}
    os.makedirs(output_dir, exist_ok=True)
    merged.save_pretrained(output_dir)  # type: ignore[operator]
    trained.image_processor.save_pretrained(output_dir)
    with open(os.path.join(trained.directory, LABELS_NAME), encoding="utf-8") as fh:
        atomic_write_text(os.path.join(output_dir, LABELS_NAME), fh.read())
    write_merged_model_card(output_dir, trained.directory, trained.model.peft_config, len(trained.id2label))
    return merged
