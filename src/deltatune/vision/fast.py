"""A faster image data path: reduced-size JPEG decoding, one resampling pass, uint8 until the batch.

Same augmentations as :class:`~deltatune.vision.transforms.ImageTransform` (random resized crop + flip for
training, resize + centre crop for evaluation, then ``(x/255 − mean)/std``), reorganised for speed:

1. **Decode at reduced size.** A JPEG is opened lazily and decoded with PIL's ``draft`` mode, which makes
   libjpeg scale by 1/2, 1/4 or 1/8 inside the inverse DCT. The default (``draft="image"``) keeps the
   decoded image at least as large as the output (a 512 px photo becomes 256 px for a 224 px model),
   which is what pre-resizing a dataset does; ``draft="crop"`` keeps every random crop at full
   detail (its box stays at least output-sized; faster only for large crops and for evaluation);
   ``draft=None`` decodes in full. Other formats decode in full.
2. **Crop by slicing, resize once** with torch's vectorised uint8 bilinear (antialiased) resampling, which
   agrees with PIL's to about one intensity level at ~2.5x its speed; flip by a reversed copy. The crop
   box is rounded to whole pixels of the decoded image (at most half a pixel of it).
3. **uint8 per example, normalise per batch.** The transform returns a (H, W, 3) uint8 tensor (150 KB
   for 224 px, a quarter of float32); :class:`FastCollate` stacks the batch and converts, permutes and
   normalises it in three vectorised passes instead of three per image.

Example:
    >>> folder = ImageFolderDataset.from_directory(Path("data/train"))
    >>> transform = FastImageTransform.from_processor(processor, train=True)
    >>> train = TransformedDataset(ImagePathRows(folder.files, folder.labels), transform)
    >>> loader = DataLoader(train, batch_size=32, shuffle=True, collate_fn=transform.collate())

Everything pickles, so ``DataLoader(num_workers > 0)`` works.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .folder import ImageFolderDataset
from .loading import HubSplit, SubsetDataset
from .preprocess import open_image
from .transforms import ImageTransform, build_transforms, to_rgb

__all__ = [
    "DRAFT_MODES",
    "FastCollate",
    "FastImageTransform",
    "ImagePathRows",
    "decode",
    "open_image",
    "undecoded",
]

DRAFT_MODES = ("image", "crop", None)
_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90°


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # a malformed EXIF block must not make the image unreadable
        return 1


def decode(
    image: Image.Image, request: tuple[int, int] | None, orientation: int | None = None
) -> Image.Image:
    """Decodes ``image`` upright in RGB, at reduced size when it is an unloaded JPEG and ``request`` is given.

    Args:
        image: A lazily opened image.
        request: Minimum (width, height) wanted in the upright frame; libjpeg picks the smallest
            1/1, 1/2, 1/4 or 1/8 scale that keeps both at least this large.
        orientation: The EXIF orientation when already read (read from the header otherwise).
    """
    if orientation is None:
        orientation = _orientation(image)
    if request is not None and image.format == "JPEG":  # a no-op once the image is loaded
        w, h = request
        if orientation in _SWAPS_AXES:
            w, h = h, w
        w, h = min(w, image.size[0]), min(h, image.size[1])
        image.draft("RGB", (max(1, w), max(1, h)))
    image.load()
    if orientation not in (0, 1):
        image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        image = to_rgb(image)
    return image


class FastImageTransform:
    """Image source → uint8 tensor (height, width, 3), with the augmentations of an :class:`ImageTransform`.

    Kept over ``torchvision.io.decode_image`` + ``v2.RandomResizedCrop`` + ``v2.RandomHorizontalFlip``:
    decoding at reduced size made it 1.09-1.15x faster on 512 px JPEGs, more on larger photos
    (``python -m benchmarks.vision_paths``; torchvision decodes a whole JPEG 2.4x faster than PIL, but only
    whole). Its crop boxes come from a per-example seeded generator, so resumed runs see the same crops.

    Args:
        spec: The transform whose size, crop ranges, flip and statistics to follow.
        draft: Reduced-size JPEG decoding: ``"image"`` (decoded image at least output-sized; default),
            ``"crop"`` (each crop box at least output-sized) or None (full decode).

    Raises:
        ValueError: for an unknown ``draft``.
    """

    def __init__(self, spec: ImageTransform, draft: str | None = "image") -> None:
        if draft not in DRAFT_MODES:
            raise ValueError(
                f"draft={draft!r} is not valid; choose one of {', '.join(map(repr, DRAFT_MODES))}"
            )
        self.spec = spec
        self.draft = draft

    @classmethod
    def from_processor(
        cls, image_processor_or_stats: Any, train: bool, draft: str | None = "image", **kwargs: Any
    ) -> FastImageTransform:
        """Like :func:`~deltatune.vision.transforms.build_transforms` (same arguments), made fast."""
        return cls(build_transforms(image_processor_or_stats, train, **kwargs), draft)

    def collate(self) -> FastCollate:
        """The collate function that turns this transform's uint8 examples into a normalised batch."""
        spec = self.spec
        return FastCollate(spec.mean, spec.std, normalize=spec.normalize)

    def __repr__(self) -> str:
        return f"FastImageTransform({self.spec!r}, draft={self.draft!r})"

    def _request(self, width: int, height: int, box: tuple[float, float, float, float] | None) -> Any:
        out_h, out_w = self.spec.size
        if self.draft is None:
            return None
        if self.draft == "crop" and box is not None:
            box_w, box_h = box[2] - box[0], box[3] - box[1]
            return -(-width * out_w // max(1, int(box_w))), -(-height * out_h // max(1, int(box_h)))
        return out_w, out_h

    #: Draws its crop and flip from the ``generator`` it is called with (see ``TransformedDataset``).
    accepts_generator = True

    def __call__(self, source: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """Args: source: see :func:`open_image`; generator: the randomness of the training crop and flip
        (torch's global generator when None). Returns: uint8 tensor (height, width, 3)."""
        spec = self.spec
        out_h, out_w = spec.size
        image = open_image(source)
        width, height = image.size
        orientation = _orientation(image)
        if orientation in _SWAPS_AXES:
            width, height = height, width
        if spec.train:
            box = spec.random_crop_box(width, height, generator=generator)
            image = decode(image, self._request(width, height, box), orientation)
            pixels = _pixels(image)
            scale_x, scale_y = image.size[0] / width, image.size[1] / height
            left = min(round(box[0] * scale_x), image.size[0] - 1)  # a 1-px-wide box at the edge stays inside
            top = min(round(box[1] * scale_y), image.size[1] - 1)
            right = max(left + 1, min(image.size[0], round(box[2] * scale_x)))
            bottom = max(top + 1, min(image.size[1], round(box[3] * scale_y)))
            out = _resize(pixels[top:bottom, left:right], out_h, out_w)
            if spec.horizontal_flip and torch.rand(1, generator=generator).item() < 0.5:
                out = out.flip(1)
            return out
        if spec.resize_to is None:
            target = (out_w, out_h)
        else:
            short = min(width, height)
            target = (
                max(1, round(width * spec.resize_to / short)),
                max(1, round(height * spec.resize_to / short)),
            )
        image = decode(image, None if self.draft is None else target, orientation)
        out = _resize(_pixels(image), target[1], target[0])
        left, top = round((target[0] - out_w) / 2.0), round((target[1] - out_h) / 2.0)
        return out[top : top + out_h, left : left + out_w]


def _pixels(image: Image.Image) -> torch.Tensor:
    """(H, W, 3) uint8 tensor of an RGB image (one copy, writable)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8))


def _resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear, antialiased resize of an (H, W, 3) uint8 tensor to (height, width, 3) uint8.

    torch's uint8 path (channels-last, vectorised) is ~2.5x faster than PIL's ``resize`` for a 256 → 224
    px image and agrees with it to about one intensity level; a no-op size returns the input. Kept over
    ``torchvision.transforms.v2.functional.resize``, which takes a channels-first tensor and was 1.5-2.3x
    slower on the same images (``python -m benchmarks.vision_paths``)."""
    if pixels.shape[0] == height and pixels.shape[1] == width:
        return pixels
    # (1, 3, H, W) in channels-last memory: a view of a whole image, one compact copy of a crop. The
    # vectorised uint8 kernel needs it, and then returns channels-last too, i.e. a contiguous (H, W, 3).
    batch = pixels.permute(2, 0, 1).unsqueeze(0).contiguous(memory_format=torch.channels_last)
    out = torch.nn.functional.interpolate(
        batch, size=(height, width), mode="bilinear", antialias=True, align_corners=False
    )
    return out[0].permute(1, 2, 0)


class FastCollate:
    """Stacks uint8 (H, W, 3) examples into a float batch (B, 3, H, W) normalised as ``(x/255 − mean)/std``.

    One pass per batch: 1.8-2.6x faster than ``v2.Normalize`` per example (``python -m benchmarks.vision_paths``).

    Args:
        mean: Per-channel mean (3 values) in [0, 1] units.
        std: Per-channel standard deviation (3 values, > 0).
        normalize: When False, only scale to [0, 1].

    Returns (when called on a list of ``{"pixel_values", "labels"}`` rows):
        ``{"pixel_values": float32 (B, 3, H, W), "labels": int64 (B,)}``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], normalize: bool = True) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"need 3 means and 3 positive stds, got {list(mean)} and {list(std)}")
        self.mean = [float(m) for m in mean] if normalize else [0.0] * 3
        self.std = [float(s) for s in std] if normalize else [1.0] * 3

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if len(examples) == 0:
            raise ValueError("FastCollate got an empty batch")
        pixels = torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples])  # (B, H, W, 3) uint8
        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[-1] != 3:
            raise ValueError(
                f"FastCollate expects uint8 (H, W, 3) pixel_values from FastImageTransform, got "
                f"{tuple(pixels.shape[1:])} {pixels.dtype}"
            )
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        scale = 1.0 / (255.0 * std)
        shift = -torch.tensor(self.mean).view(1, 3, 1, 1) / std
        # One strided converting copy (HWC uint8 → CHW float), then the affine map in place.
        batch = torch.empty(pixels.shape[0], 3, *pixels.shape[1:3], dtype=torch.float32)
        batch.copy_(pixels.permute(0, 3, 1, 2))
        batch.mul_(scale).add_(shift)
        labels = [e["labels"] if "labels" in e else e["label"] for e in examples]
        return {"pixel_values": batch, "labels": torch.tensor([int(v) for v in labels], dtype=torch.long)}


class ImagePathRows:
    """Rows ``{"image": path, "label": int}`` whose images are not decoded, for :class:`TransformedDataset`
    with a :class:`FastImageTransform` (which needs undecoded JPEGs to decode at reduced size).

    Args:
        files: Image paths (e.g. ``ImageFolderDataset.files``).
        labels: Class index per path.
    """

    def __init__(self, files: Sequence[str | os.PathLike[str]], labels: Sequence[int]) -> None:
        if len(files) != len(labels):
            raise ValueError(f"got {len(files)} files but {len(labels)} labels")
        self.files = [os.fspath(f) for f in files]
        self.labels = [int(v) for v in labels]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.files[index], "label": self.labels[index]}


def undecoded(split: Any) -> Any:
    """``split`` with its images left undecoded where the source allows it.

    An image folder becomes :class:`ImagePathRows` (paths), a hub split gets its ``Image`` column cast to
    ``decode=False`` and a subset of either is rebuilt over the undecoded source; anything else (e.g.
    in-memory images) is returned unchanged.
    """
    if isinstance(split, ImageFolderDataset):
        return ImagePathRows(split.files, split.labels)
    if isinstance(split, HubSplit):
        return split.undecoded()
    if isinstance(split, SubsetDataset):
        inner = undecoded(split.dataset)
        return split if inner is split.dataset else SubsetDataset(inner, split.indices)
    return split
