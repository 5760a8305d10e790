"""Evaluation-time preprocessing, defined once: the run's evaluation, ``deltatune evaluate``, ``deltatune
predict`` and ``transformers.pipeline("image-classification")`` on a merged model all go through it.

**Decoding** is transformers' own (:func:`transformers.image_utils.load_image`, what the pipeline runs on a
path or a PIL image): the EXIF orientation applied, then PIL's ``convert("RGB")``. Transparency is therefore
dropped (not composited), a palette is expanded, CMYK converted by PIL, and 16-bit images are clipped to
0-255 as PIL does -- the same everywhere, so what a run reports is what a deployed model sees. Before any
pixel is decoded, an image whose header promises more than ``PIL.Image.MAX_IMAGE_PIXELS`` is refused.

**Resizing** is the guide's evaluation transform -- resize the shorter side to the crop's longer side
(bilinear, antialiased), centre crop, scale to [0, 1], normalise -- written as a transformers
``BitImageProcessor`` (``size={"shortest_edge": N}``, ``crop_size``, ``resample=BILINEAR``). It is the
processor in transformers 5 whose defaults are exactly "shorter side, then centre crop" with a configurable
resampling (``ViTImageProcessor`` stretches to a square; ``ConvNextImageProcessor`` derives the resize from
``crop_pct``; ``CLIPImageProcessor`` adds CLIP's own statistics). It is written as ``preprocessor_config.json``
beside the adapter and into a merged model, and :func:`preprocess` calls that very processor on each image,
so the pixels the pipeline computes are the pixels the run evaluated. The processor's backend is the one
``AutoImageProcessor`` picks here (torchvision when installed, else PIL); a model deployed where the other
backend is installed gets pixels within about one intensity level.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from .folder import SKIPPED_KEY, Unreadable
from .limits import check_image_pixels
from .transforms import CROP_SCALE_KEY, HORIZONTAL_FLIP_KEY, _stat, resolve_size, to_rgb

__all__ = [
    "EVAL_PROCESSOR_CLASS",
    "EvalCollate",
    "EvalTransform",
    "SkippedNames",
    "evaluation_processor",
    "load_rgb",
    "open_image",
    "preprocess",
    "preprocess_batch",
    "source_name",
]

#: The transformers image processor class that writes the evaluation transform down (see the module doc).
EVAL_PROCESSOR_CLASS = "BitImageProcessor"
_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, as transformers' processors store it


def source_name(source: Any) -> str | None:
    """The path an image comes from, when it has one (a path, a ``{"path": ...}`` dict, an opened file)."""
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    if isinstance(source, Mapping) and source.get("path"):
        return str(source["path"])
    name = getattr(source, "filename", None)
    return str(name) if name else None


def open_image(source: Any) -> Image.Image:
    """Opens an image lazily (header only): a path, bytes, a ``{"bytes", "path"}`` dict (``datasets``'
    ``Image(decode=False)``) or a PIL image (returned as is). Every data path opens files here, so the
    decompression-bomb limit (:func:`~deltatune.vision.limits.check_image_pixels`) holds on all of them.

    Raises:
        TypeError: for any other type.
        ValueError: for more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``, before any is decoded.
    """
    if isinstance(source, Image.Image):
        return source
    image: Image.Image | None = None
    if isinstance(source, bytes | bytearray | memoryview):
        image = Image.open(io.BytesIO(bytes(source)))
    elif isinstance(source, str | os.PathLike):
        image = Image.open(source)
    elif isinstance(source, Mapping):
        if source.get("bytes") is not None:
            image = Image.open(io.BytesIO(source["bytes"]))
        elif source.get("path") is not None:
            image = Image.open(source["path"])
    if image is not None:
        check_image_pixels(image, source_name(source) or "image")
        return image
    raise TypeError(
        "expected an image path, bytes, a {'bytes', 'path'} dict or a PIL image, got " + type(source).__name__
    )


def load_rgb(source: Any) -> Image.Image:
    """Decodes an image as ``transformers.image_utils.load_image`` does (EXIF orientation, then
    ``convert("RGB")``), after checking its pixel count against the decompression-bomb limit.

    Args:
        source: A path, bytes, a ``{"bytes", "path"}`` dict or a PIL image.

    Raises:
        ValueError: when the image has more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``.
        OSError: when it cannot be decoded.
    """
    if isinstance(source, Image.Image):  # open_image checks what it opens; an image handed in, here
        check_image_pixels(source, source_name(source) or "image")
    return to_rgb(open_image(source))  # a new image always (exif_transpose copies), as load_image's


def evaluation_processor(image_processor_or_stats: Any) -> Any:
    """The evaluation transform of a processor (or a mapping of its settings) as a ``BitImageProcessor``:
    shorter side resized to the crop's longer side, bilinear, centre crop to the processor's size, its mean
    and std. The training-augmentation keys a processor config may carry (``train_crop_scale``,
    ``train_horizontal_flip``) are kept. Idempotent.

    Raises:
        ValueError: when the processor names no usable size.
    """
    import transformers
    from transformers.utils import is_torchvision_available

    # the backend AutoImageProcessor (and so the pipeline) picks: torchvision when installed, else PIL. The
    # saved config cannot pin one (both classes write image_processor_type "BitImageProcessor" and
    # AutoImageProcessor chooses by what is installed), so pinning ours would part from the pipeline's.
    name = "BitImageProcessor" if is_torchvision_available() else "BitImageProcessorPil"
    processor_class = getattr(transformers, name)

    size = resolve_size(image_processor_or_stats)
    height, width = (size, size) if isinstance(size, int) else size
    mean = _stat(image_processor_or_stats, "image_mean")
    std = _stat(image_processor_or_stats, "image_std")
    mean = [0.5] * 3 if mean is None else [float(mean)] * 3 if isinstance(mean, int | float) else list(mean)
    std = [0.5] * 3 if std is None else [float(std)] * 3 if isinstance(std, int | float) else list(std)
    extra = {
        key: _stat(image_processor_or_stats, key)
        for key in (CROP_SCALE_KEY, HORIZONTAL_FLIP_KEY)
        if _stat(image_processor_or_stats, key) is not None
    }
    return processor_class(
        do_resize=True,
        size={"shortest_edge": max(height, width)},
        resample=_BILINEAR,
        do_center_crop=True,
        crop_size={"height": height, "width": width},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=_stat(image_processor_or_stats, "do_normalize") is not False,
        image_mean=mean,
        image_std=std,
        do_convert_rgb=True,
        **extra,
    )


def preprocess(processor: Any, image: Image.Image) -> torch.Tensor:
    """One decoded RGB image → (3, H, W) float32 pixel values, by ``processor`` itself (as the pipeline)."""
    return processor(images=image, return_tensors="pt")["pixel_values"][0]


def preprocess_batch(processor: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    """Decoded RGB images → (N, 3, H, W) float32 pixel values in one ``processor`` call (the pipeline's batch
    call); each row equals :func:`preprocess` of its image."""
    return processor(images=list(images), return_tensors="pt")["pixel_values"]


class EvalTransform:
    """Image source → (3, H, W) float32: :func:`load_rgb` then :func:`preprocess`; picklable.

    Args:
        processor: An evaluation processor (see :func:`evaluation_processor`).
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, source: Any) -> torch.Tensor:
        return preprocess(self.processor, load_rgb(source))

    def __repr__(self) -> str:
        return f"EvalTransform({type(self.processor).__name__})"


class EvalCollate:
    """A collate function that stacks evaluation rows (float (3, H, W) pixel values) and hands any other
    batch to ``train_collate``; an unreadable row (:class:`~.folder.Unreadable`, or None) is dropped and its name
    carried in the batch under :data:`~.folder.SKIPPED_KEY` (a batch without one has no such key), for
    :class:`SkippedNames` to take in the main process.

    Args:
        train_collate: The training data path's collate function (its ``device_transform`` is kept).
        size: (height, width) of the evaluation images, for the empty batch of a batch that was all unreadable.
    """

    def __init__(self, train_collate: Any, size: tuple[int, int] = (1, 1)) -> None:
        self.train_collate = train_collate
        self.size = (int(size[0]), int(size[1]))
        self.device_transform = getattr(train_collate, "device_transform", None)

    def __call__(self, examples: Sequence[Mapping[str, Any] | Unreadable | None]) -> dict[str, Any]:
        rows = [e for e in examples if e is not None and not isinstance(e, Unreadable)]
        batch = self._stack(rows)
        if len(rows) != len(examples):
            names = [e.name for e in examples if isinstance(e, Unreadable)]
            if names:
                batch[SKIPPED_KEY] = names
        return batch

    def _stack(self, rows: list[Mapping[str, Any]]) -> dict[str, Any]:
        first = rows[0]["pixel_values"] if rows else None
        if rows and not (isinstance(first, torch.Tensor) and first.is_floating_point() and first.dim() == 3):
            return dict(self.train_collate(rows))
        if not rows:
            empty = torch.empty(0, 3, *self.size)
            return {"pixel_values": empty, "labels": torch.empty(0, dtype=torch.long)}
        labels = [e["labels"] if "labels" in e else e["label"] for e in rows]
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in rows]),
            "labels": torch.tensor([int(v) for v in labels], dtype=torch.long),
        }


class SkippedNames:
    """A trainer's ``device_batch_transform`` (``(batch, device) -> batch``, run in the main process on each
    batch): moves the names an evaluation batch carries (:class:`EvalCollate`) into ``dataset.note_skipped``,
    so the dataset lists them whichever process read the images, then runs ``device_transform`` (if any).

    Args:
        dataset: The evaluation dataset (:class:`~.transforms.TransformedDataset`).
        device_transform: The training path's device transform (``EvalCollate.device_transform``), or None.
    """

    def __init__(self, dataset: Any, device_transform: Any = None) -> None:
        self.dataset = dataset
        self.device_transform = device_transform

    def __call__(self, batch: dict[str, Any], device: Any) -> dict[str, Any]:
        names = batch.pop(SKIPPED_KEY, None)
        if names:
            self.dataset.note_skipped(names)
        return batch if self.device_transform is None else self.device_transform(batch, device)
