"""Image transforms built from an image processor's statistics, the on-the-fly dataset wrapper and the
collate function.

Everything here is a module-level class or function, so it pickles: ``DataLoader(num_workers > 0)`` and
``TrainingArguments(dataloader_num_workers > 0)`` work. Randomness comes from the generator a transform is
called with: :class:`TransformedDataset` with a ``seed`` passes one seeded from (seed, epoch, index) (see
:mod:`~deltatune.vision.randomness`), so runs resume exactly; without one, torch's global generator.

Training:   RandomResizedCrop(size) → RandomHorizontalFlip → ToTensor → Normalize(mean, std)
Evaluation: Resize(size) → CenterCrop(size) → ToTensor → Normalize(mean, std)

:class:`ImageTransform` works on PIL images and needs neither torchvision nor the processor's own resizing
code. It is the specification the training paths follow (its crop box, flip and statistics) and the reference
they are tested against; the paths themselves are :mod:`.fast`, :mod:`.standard` (torchvision's JPEG decoder)
and :mod:`.gpu`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .folder import Unreadable, row_name
from .randomness import SharedEpoch, apply_seeded, sample_generator

logger = logging.getLogger(__name__)

# Extra keys a preprocessor_config.json may carry to tune the training augmentation for its domain; the
# bundled backbone uses them because characters are not invariant to flips or to 8% crops.
CROP_SCALE_KEY = "train_crop_scale"
HORIZONTAL_FLIP_KEY = "train_horizontal_flip"
DEFAULT_CROP_SCALE = (0.08, 1.0)
DEFAULT_CROP_RATIO = (3 / 4, 4 / 3)
_MAX_CONSECUTIVE_FAILURES = 50


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL image to 8-bit RGB upright, exactly as transformers' ``load_image`` does (and so its
    image-classification pipeline): the EXIF orientation applied, then ``convert("RGB")`` -- transparency
    dropped, palettes expanded, CMYK converted, 16-bit values clipped, all by PIL. One decoding for training,
    the run's evaluation, ``evaluate``, ``predict`` and a deployed model (see :mod:`.preprocess`).

    Returns:
        An ``RGB`` image (after EXIF rotation) of any PIL ``image``.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        _warn_wide_once(image)
    upright = ImageOps.exif_transpose(image)
    return upright if upright.mode == "RGB" else upright.convert("RGB")


_warned_wide: list[str] = []


def _warn_wide_once(image: Image.Image) -> None:
    """Says once per process that 16-bit/float images are clipped to 8 bits, as transformers decodes them."""
    if not _warned_wide:
        _warned_wide.append(image.mode)
        name = getattr(image, "filename", None)
        logger.warning(
            "%s (%s mode): decoded as transformers' pipeline decodes it, values above 255 clipped to white; "
            "convert such images to 8 bits for a model to see them as you do",
            f"image {name!r}"
            if name
            else "a 16-bit or float image",  # repr: a newline in a name stays on the line
            image.mode,
        )


def _size_field(size: Any, key: str) -> int | None:
    value = size.get(key) if hasattr(size, "get") else getattr(size, key, None)
    return None if value is None else int(value)


def _stat(source: Any, key: str) -> Any:
    if isinstance(source, Mapping):
        return source.get(key)
    return getattr(source, key, None)


def resolve_size(image_processor_or_stats: Any) -> tuple[int, int] | int:
    """The output size a processor asks for: ``(height, width)``, or an int for ``shortest_edge``.

    ``crop_size`` wins over ``size`` when both exist (processors that resize then crop).

    Raises:
        ValueError: if no usable size is found.
    """
    for key in ("crop_size", "size"):
        size = _stat(image_processor_or_stats, key)
        if size is None:
            continue
        if isinstance(size, int):
            return size
        if isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2:
            return int(size[0]), int(size[1])
        height, width = _size_field(size, "height"), _size_field(size, "width")
        if height is not None and width is not None:
            return height, width
        shortest = _size_field(size, "shortest_edge")
        if shortest is not None:
            return shortest
    raise ValueError(
        "cannot find the image size: expected `size` (or `crop_size`) as an int, (height, width), or a dict "
        f"with 'height' and 'width' or 'shortest_edge'; got size={_stat(image_processor_or_stats, 'size')!r}"
    )


class ImageTransform:
    """PIL image → normalised tensor of shape (3, height, width); picklable.

    Args:
        size: Output ``(height, width)``.
        mean: Per-channel mean subtracted after scaling to [0, 1] (3 values).
        std: Per-channel standard deviation (3 values, all > 0).
        train: Random resized crop + horizontal flip when True; resize + centre crop when False.
        keep_aspect: Evaluation resize: True scales the image (keeping its aspect ratio) until it covers
            ``size`` and then crops the centre, like the guide's ``Resize(size)`` + ``CenterCrop(size)``;
            False resizes straight to ``size``, like ``ViTImageProcessor``. Equal for square images.
        crop_scale: Area fraction range of the random crop (torchvision's default (0.08, 1.0)).
        crop_ratio: Aspect-ratio range of the random crop.
        horizontal_flip: Flip with probability 0.5 during training.
        normalize: Apply ``(x - mean) / std``.
    """

    def __init__(
        self,
        size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        *,
        keep_aspect: bool = True,
        crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
        crop_ratio: tuple[float, float] = DEFAULT_CROP_RATIO,
        horizontal_flip: bool = True,
        normalize: bool = True,
    ) -> None:
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"size must be (height, width) with positive values, got {size!r}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(
                f"image_mean and image_std need 3 values (RGB), got {list(mean)} and {list(std)}"
            )
        if min(std) <= 0:
            raise ValueError(f"image_std must be positive, got {list(std)}")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale!r}")
        if not 0 < crop_ratio[0] <= crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {crop_ratio!r}")
        self.size = (int(size[0]), int(size[1]))
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.train = bool(train)
        self.keep_aspect = bool(keep_aspect)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.crop_ratio = (float(crop_ratio[0]), float(crop_ratio[1]))
        self.horizontal_flip = bool(horizontal_flip)
        self.normalize = bool(normalize)

    def __repr__(self) -> str:
        kind = "train" if self.train else "eval"
        return (
            f"ImageTransform({kind}, size={self.size}, mean={self.mean}, std={self.std}, "
            f"crop_scale={self.crop_scale}, horizontal_flip={self.horizontal_flip})"
        )

    #: The transform draws from the ``generator`` it is called with (see :class:`TransformedDataset`).
    accepts_generator = True

    def random_crop_box(
        self, width: int, height: int, generator: torch.Generator | None = None
    ) -> tuple[int, int, int, int]:
        """A random (left, top, right, bottom) box with area in ``crop_scale`` and ratio in ``crop_ratio``,
        drawn from ``generator`` (torch's global one when None)."""
        area = width * height
        log_ratio = (math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]))
        for _ in range(10):
            target = area * torch.empty(1).uniform_(*self.crop_scale, generator=generator).item()
            ratio = math.exp(torch.empty(1).uniform_(*log_ratio, generator=generator).item())
            w = round(math.sqrt(target * ratio))
            h = round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
                return left, top, left + w, top + h
        # Fallback: the largest centred crop whose ratio lies in range.
        in_ratio = width / height
        if in_ratio < self.crop_ratio[0]:
            w, h = width, round(width / self.crop_ratio[0])
        elif in_ratio > self.crop_ratio[1]:
            h, w = height, round(height * self.crop_ratio[1])
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def eval_resize_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) an evaluation image of that size is resized to before the centre crop."""
        out_h, out_w = self.size
        if not self.keep_aspect:
            return out_w, out_h
        scale = max(out_w / width, out_h / height)
        return max(out_w, round(width * scale)), max(out_h, round(height * scale))

    @property
    def resize_to(self) -> int | None:
        """Shorter-edge target of the evaluation resize (None: stretch to ``size``); exact for square sizes
        (:meth:`eval_resize_size` is exact for any)."""
        return max(self.size) if self.keep_aspect else None

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image → float tensor (3, H, W) in [0, 1], normalised when configured."""
        array = np.asarray(image, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array.transpose(2, 0, 1).copy())
        if self.normalize:
            mean = torch.tensor(self.mean).view(3, 1, 1)
            std = torch.tensor(self.std).view(3, 1, 1)
            tensor = (tensor - mean) / std
        return tensor

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """Args: image: a PIL image of any mode and size; generator: the randomness of the training crop
        and flip (torch's global generator when None). Returns: tensor (3, height, width), float32."""
        image = to_rgb(image)
        height, width = self.size
        if self.train:
            box = self.random_crop_box(*image.size, generator=generator)
            image = image.resize((width, height), Image.Resampling.BILINEAR, box=box)
            if self.horizontal_flip and torch.rand(1, generator=generator).item() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            image = image.resize(self.eval_resize_size(*image.size), Image.Resampling.BILINEAR)
            image = center_crop(image, height, width)
        return self.to_tensor(image)


def center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Crops the centre (padding with black where the image is smaller), like torchvision's CenterCrop."""
    w, h = image.size
    left = round((w - width) / 2.0)
    top = round((h - height) / 2.0)
    return image.crop((left, top, left + width, top + height))


def build_transforms(
    image_processor_or_stats: Any,
    train: bool,
    *,
    crop_scale: tuple[float, float] | None = None,
    horizontal_flip: bool | None = None,
    keep_aspect: bool = True,
) -> ImageTransform:
    """Builds the training or evaluation transform from an image processor (or a dict of its statistics).

    Reads ``image_mean``, ``image_std``, ``do_normalize`` and ``size`` (``{"height", "width"}`` or
    ``{"shortest_edge"}``, or ``crop_size`` when present). A processor config may also carry
    ``train_crop_scale`` (e.g. ``[0.6, 1.0]``) and ``train_horizontal_flip`` (bool) to suit its domain.

    Args:
        image_processor_or_stats: A transformers image processor, or a mapping with the same keys.
        train: Training (random resized crop + flip) or evaluation (resize + centre crop).
        crop_scale: Overrides the crop area range; default from the processor, else (0.08, 1.0).
        horizontal_flip: Overrides flipping; default from the processor, else True.
        keep_aspect: Evaluation keeps the aspect ratio (resize to cover, centre crop); False stretches to
            the size as ``ViTImageProcessor`` does.

    Returns:
        A picklable :class:`ImageTransform`: PIL image → tensor (3, height, width).

    Raises:
        ValueError: if the size or statistics are missing or malformed.
    """
    size = resolve_size(image_processor_or_stats)
    output = (size, size) if isinstance(size, int) else size
    mean = _stat(image_processor_or_stats, "image_mean")
    std = _stat(image_processor_or_stats, "image_std")
    do_normalize = _stat(image_processor_or_stats, "do_normalize")
    if mean is None or std is None:
        if do_normalize is not False:
            logger.warning("no image_mean/image_std found; normalising with mean 0.5 and std 0.5")
        mean, std = [0.5] * 3, [0.5] * 3
    if isinstance(mean, (int, float)):
        mean = [float(mean)] * 3
    if isinstance(std, (int, float)):
        std = [float(std)] * 3
    scale = crop_scale if crop_scale is not None else _stat(image_processor_or_stats, CROP_SCALE_KEY)
    scale = DEFAULT_CROP_SCALE if scale is None else scale
    if not isinstance(scale, Sequence) or len(scale) != 2:
        raise ValueError(f"{CROP_SCALE_KEY} must be two numbers (low, high), got {scale!r}")
    if horizontal_flip is None:
        configured_flip = _stat(image_processor_or_stats, HORIZONTAL_FLIP_KEY)
        horizontal_flip = True if configured_flip is None else bool(configured_flip)
    return ImageTransform(
        output,
        mean,
        std,
        train,
        keep_aspect=keep_aspect,
        crop_scale=(float(scale[0]), float(scale[1])),
        horizontal_flip=horizontal_flip,
        normalize=do_normalize is not False,
    )


class TransformedDataset(torch.utils.data.Dataset):
    """Applies a transform on the fly: ``{"image", "label"}`` rows → ``{"pixel_values", "labels"}``.

        An image that cannot be read or transformed is skipped: a warning naming its file, with the running
        count, is emitted (``skipped`` lists the names) and the next readable example is returned in its
        place, so an epoch never stops halfway. After
        ``_MAX_CONSECUTIVE_FAILURES`` unreadable examples in a row it raises (that is a broken dataset, not a
        few bad files). ``num_skipped`` counts skips in this process (each DataLoader worker counts its own);
    ``skipped`` lists the distinct files.

        With a ``seed``, an example's random augmentation depends only on (seed, epoch, index): the epoch comes
        from :meth:`set_epoch` (``DeltaTrainer`` calls it at each epoch), so the worker count and resuming
        from a checkpoint do not change it. Without one, transforms draw from torch's global generator.

        Args:
            dataset: A map-style dataset (``__len__``, ``__getitem__``) whose rows are dicts.
            transform: A callable PIL image → tensor (3, H, W), e.g. from :func:`build_transforms`.
            image_key: Row key of the image.
            label_key: Row key of the integer label.
            seed: Seed of the per-example augmentation randomness (None: torch's global generator).
            skip_unreadable: Return :class:`~.folder.Unreadable` (its name) for an unreadable image instead of its
                next readable neighbour (evaluation: every image scored once; the collate drops it, keeping the name).
    """

    def __init__(
        self,
        dataset: Any,
        transform: Any,
        *,
        image_key: str = "image",
        label_key: str = "label",
        seed: int | None = None,
        skip_unreadable: bool = False,
    ) -> None:
        self.dataset = dataset
        self.skip_unreadable = skip_unreadable
        self.skipped: list[str] = []  # distinct files, in the order found
        self._seen: set[str] = set()
        self.transform = transform
        self.image_key = image_key
        self.label_key = label_key
        self.num_skipped = 0
        self.seed = seed
        self._epoch = SharedEpoch() if seed is not None else None

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch the per-example augmentation is drawn for (seen by DataLoader workers too)."""
        if self._epoch is None:
            self._epoch = SharedEpoch()
        self._epoch.set(epoch)

    def _transform(self, image: Any, index: int) -> Any:
        if self.seed is None or self._epoch is None:
            return self.transform(image)
        return apply_seeded(self.transform, image, sample_generator(self.seed, self._epoch.get(), index))

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> dict[str, Any]:
        """The transformed example at ``index``, raising on an unreadable image."""
        row = self.dataset[index]
        return {
            "pixel_values": self._transform(row[self.image_key], index),
            "labels": int(row[self.label_key]),
        }

    def describe(self, index: int) -> str:
        """The path of example ``index`` when its source has one (an image folder, path rows), else
        ``"example <index>"`` -- how a skipped image is named."""
        return row_name(self.dataset, index)

    def note_skipped(self, names: Sequence[str]) -> None:
        """Adds to :attr:`skipped` the files not yet in it (e.g. found by a DataLoader worker's copy)."""
        for name in names:
            if name not in self._seen:
                self._seen.add(name)
                self.skipped.append(name)

    def _skip(self, index: int, error: Exception) -> str:
        """Counts a skip and warns, naming the file (quoted: the CLI shows a warning that differs only in its
        quoted names and numbers once, then one count of them all); returns the name."""
        name = self.describe(index)
        self.num_skipped += 1
        self.note_skipped([name])
        text = str(error).replace(repr(name), "").replace(name, "")
        reason = " ".join(text.split()).strip(" :") or type(error).__name__
        warnings.warn(
            f"skipped unreadable image {name!r} ({type(error).__name__}: {reason[:200]})",
            RuntimeWarning,
            stacklevel=3,
        )
        return name

    def __getitem__(self, index: int) -> dict[str, Any] | Unreadable:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} examples")
        index %= n
        if self.skip_unreadable:
            try:
                return self.load(index)
            except Exception as error:  # any decoding failure: PIL raises OSError, SyntaxError, ValueError...
                return Unreadable(self._skip(index, error))
        last_error: Exception | None = None
        for attempt in range(min(n, _MAX_CONSECUTIVE_FAILURES)):
            current = (index + attempt) % n
            try:
                return self.load(current)
            except Exception as error:
                last_error = error
                self._skip(current, error)
        raise RuntimeError(
            f"no readable image among {min(n, _MAX_CONSECUTIVE_FAILURES)} consecutive examples from "
            f"{self.describe(index)}; the dataset looks broken (last error: {last_error!r})"
        ) from last_error


def collate_fn(examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stacks examples into a batch.

    Args:
        examples: Rows with ``pixel_values`` (tensor (3, H, W)) and ``labels`` (or ``label``) ints.

    Returns:
        ``{"pixel_values": (batch, 3, H, W) float tensor, "labels": (batch,) int64 tensor}``.
    """
    if len(examples) == 0:
        raise ValueError("collate_fn got an empty batch")
    pixel_values = torch.stack([torch.as_tensor(example["pixel_values"]) for example in examples])
    labels = [example["labels"] if "labels" in example else example["label"] for example in examples]
    return {
        "pixel_values": pixel_values,
        "labels": torch.tensor([int(label) for label in labels], dtype=torch.long),
    }
