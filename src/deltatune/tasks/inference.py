"""Using a trained adapter directory: load it, predict images, evaluate a split (merging: :mod:`.merge`)."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._files import (
    read_json,
)
from ..config import CONFIG_NAME, PeftConfig
from ..model import PeftModel
from ..train.metrics import ClassificationReport
from ..train.outputs import RUN_RECORD_NAME
from .classifier import build_base_model
from .labels import adapter_class_names
from .merge import _require_adapter_dir

logger = logging.getLogger(__name__)

__all__ = [
    "Evaluation",
    "TrainedAdapter",
    "base_model_source",
    "collect_images",
    "evaluate_adapter",
    "load_trained",
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


def base_model_source(adapter_dir: str, model: str | None) -> tuple[str, str]:
    """(the base model an adapter loads onto, how to name it in an error): ``model`` (``--model``) or the
    adapter config's ``base_model_name_or_path``.

    Raises:
        FileNotFoundError: when ``adapter_dir`` is not an adapter folder.
        ValueError: when no base model is known.
    """
    if model:
        return model, "--model"
    _require_adapter_dir(adapter_dir)
    base = PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path or _random_backbone_model(
        adapter_dir
    )
    if not base:
        raise ValueError(f"{adapter_dir}/{CONFIG_NAME} names no base_model_name_or_path; pass --model")
    return base, f"the adapter's base model (base_model_name_or_path in {adapter_dir}/{CONFIG_NAME})"


def _random_backbone_model(adapter_dir: str) -> str | None:
    """The model whose architecture a random-backbone run rebuilt (its run record's ``model``): the adapter
    config of such a run names no ``base_model_name_or_path``, as no pretrained weights were used."""
    path = os.path.join(adapter_dir, RUN_RECORD_NAME)
    record = read_json(path, "run record") if os.path.isfile(path) else None
    if isinstance(record, dict) and record.get("random_backbone") and isinstance(record.get("model"), str):
        return str(record["model"])
    return None


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
    from ..vision.preprocess import evaluation_processor

    _require_adapter_dir(adapter_dir)
    config = PeftConfig.from_pretrained(adapter_dir)
    id2label = adapter_class_names(adapter_dir, model or config.base_model_name_or_path)
    record: dict[str, Any] = {}
    record_path = os.path.join(adapter_dir, RUN_RECORD_NAME)
    if os.path.isfile(record_path):
        loaded = read_json(record_path, "run record")
        record = loaded if isinstance(loaded, dict) else {}
    random_backbone = bool(record.get("random_backbone"))
    base_id = model or config.base_model_name_or_path or _random_backbone_model(adapter_dir)
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
        saved = processor
        processor = evaluation_processor(processor)  # an older adapter's ViT processor: the run's evaluation
        changed = processor_changes(saved, processor)
        if changed:
            logger.warning(
                "%s is applied as deltatune's evaluation transform (BitImageProcessor), which changes %s",
                processor_file,
                "; ".join(changed),
            )
    peft_model.eval()
    return TrainedAdapter(peft_model, processor, id2label, record, adapter_dir)


_PROCESSOR_SETTINGS = (
    "do_resize",
    "size",
    "do_center_crop",
    "crop_size",
    "resample",
    "do_normalize",
    "image_mean",
    "image_std",
)


def _setting(processor: Any, key: str) -> Any:
    value: Any = getattr(processor, key, None)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # transformers' SizeDict
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items() if v is not None}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [round(float(v), 6) for v in value]
    if key == "resample" and value is not None:
        return int(value)
    return value


def processor_changes(before: Any, after: Any) -> list[str]:
    """The preprocessing settings (size, crop, resampling, normalisation) that differ between two image
    processors, as ``"size {'height': 32, 'width': 32} -> {'shortest_edge': 32}"``; empty when none does."""
    changes = []
    for key in _PROCESSOR_SETTINGS:
        old, new = _setting(before, key), _setting(after, key)
        if old != new:
            changes.append(f"{key} {old} -> {new}")
    return changes


def collect_images(paths: Sequence[str]) -> list[str]:
    """Expands files and directories (recursively) into a sorted list of image files; inside a directory,
    hidden files and folders (``.DS_Store``, macOS's ``._*`` companions) are skipped as ``train`` skips them.

    Raises:
        FileNotFoundError: for a path that does not exist, or when nothing is found.
    """
    from ..vision import IMAGE_EXTENSIONS
    from ..vision.folder import is_image_file

    found: list[str] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found += sorted(
                str(p)
                for p in path.rglob("*")
                if is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(path).parts)
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


def _device_threads(trained: TrainedAdapter, num_threads: int | None) -> Any:
    """``train``'s CPU thread choice (:func:`deltatune.train.arguments.cpu_threads`) for this model."""
    from ..train.arguments import cpu_threads

    device = next(trained.model.parameters()).device
    return cpu_threads(trained.model, num_threads, device.type == "cpu")


@torch.no_grad()
def predict_images(
    trained: TrainedAdapter,
    images: Sequence[str],
    top_k: int = 5,
    batch_size: int = 32,
    progress: bool = True,
    num_threads: int | None = None,
) -> list[dict[str, Any]]:
    """Top-k labels with probabilities for each image, decoded and preprocessed exactly as transformers'
    image-classification pipeline does with the adapter's ``preprocessor_config.json`` (see
    :mod:`deltatune.vision.preprocess`).

    An image that cannot be read (truncated, not an image, too many pixels) is skipped with a counted
    warning naming it and listed with an ``"error"`` and no predictions; the others are predicted.

    Args:
        num_threads: CPU threads (None: as ``train`` chooses, one for a small model).

    Returns:
        ``[{"image": path, "predictions": [{"label": name, "score": p}, ...]}, ...]`` (scores descending), and
        ``{"image": path, "predictions": [], "error": reason}`` for a skipped image.

    Raises:
        ValueError: for a non-positive ``batch_size``/``top_k``, when no image at all could be read, or when
            the model's scores are NaN/inf.
    """
    from tqdm.auto import tqdm

    from ..vision.preprocess import load_rgb, preprocess_batch

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
    with _device_threads(trained, num_threads):
        for chunk in _batches(list(images), batch_size):
            decoded, names = [], []
            for path in chunk:
                try:
                    decoded.append(load_rgb(path))
                    names.append(path)
                except (
                    Exception
                ) as err:  # any decoding failure: PIL raises OSError, SyntaxError, ValueError...
                    skipped += 1
                    reason = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
                    logger.warning(
                        "skipped unreadable image %s (%s); %d skipped so far", path, reason, skipped
                    )
                    results.append({"image": path, "predictions": [], "error": reason})
            bar.update(len(chunk))
            if not decoded:
                continue
            pixels = preprocess_batch(trained.image_processor, decoded)  # one processor call per chunk
            logits = trained.model(pixel_values=pixels.to(device)).logits.float()
            _check_logits(logits, names, trained)
            scores, ids = logits.softmax(dim=-1).topk(k, dim=-1)
            for path, row_scores, row_ids in zip(names, scores.tolist(), ids.tolist(), strict=True):
                preds = [
                    {"label": trained.id2label[i], "score": s}
                    for i, s in zip(row_ids, row_scores, strict=True)
                ]
                results.append({"image": path, "predictions": preds})
    bar.close()
    if skipped == len(images):
        raise ValueError(f"none of the {len(images)} images could be read (see the warnings above)")
    if skipped:
        logger.warning("skipped %d of %d images that could not be read", skipped, len(images))
    order = {path: i for i, path in enumerate(images)}
    return sorted(results, key=lambda r: order.get(r["image"], 0))


@dataclass
class Evaluation:
    """What :func:`evaluate_adapter` returns: the report, the images it could not read, by path, and the mean
    cross-entropy over the images scored (``eval_loss``, as a training run's evaluation reports it; None when
    no image was scored)."""

    report: ClassificationReport
    skipped: list[str]
    loss: float | None = None


@torch.no_grad()
def evaluate_adapter(
    trained: TrainedAdapter,
    dataset: Any,
    batch_size: int = 64,
    progress: bool = True,
    num_threads: int | None = None,
) -> Evaluation:
    """Accuracy, top-5, per-class accuracy and the confusion matrix of ``dataset`` (rows ``{"image", "label"}``
    with the adapter's class ids), each image decoded and preprocessed as a run's evaluation does.

    Every row is scored once; an unreadable one is skipped and named (never replaced by another). Metrics
    are accumulated per batch, so memory stays flat with the number of images.

    Raises:
        ValueError: when the model's scores are NaN/inf.
    """
    from tqdm.auto import tqdm

    from ..vision.fast import undecoded
    from ..vision.preprocess import EvalCollate, EvalTransform
    from ..vision.transforms import TransformedDataset, collate_fn
    from .evaluation import StreamingReport, release_freed_memory

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    data = TransformedDataset(
        undecoded(dataset), EvalTransform(trained.image_processor), skip_unreadable=True
    )
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=EvalCollate(collate_fn))
    device = next(trained.model.parameters()).device
    names = [trained.id2label[i] for i in range(len(trained.id2label))]
    streaming = StreamingReport(names)
    with _device_threads(trained, num_threads):
        for number, batch in enumerate(tqdm(loader, desc="evaluate", unit="batch", disable=not progress)):
            if len(batch["labels"]) == 0:
                continue
            logits = trained.model(pixel_values=batch["pixel_values"].to(device)).logits.float()
            _check_logits(logits, [f"evaluation batch {number}"] * len(logits), trained)
            streaming.add(logits, batch["labels"])
            del batch, logits
            if number % 32 == 31:
                release_freed_memory()
    return Evaluation(streaming.report(), list(data.skipped), streaming.mean_loss)
