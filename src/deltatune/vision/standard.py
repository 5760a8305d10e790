"""The ``standard`` training data path: full decoding, float per example, the plain collate.

Same augmentation as :class:`~deltatune.vision.transforms.ImageTransform` (its crop box and flip, drawn from the
generator it is called with, so resumed runs see the same crops) with torchvision's ``RandomResizedCrop``
semantics: the box is cut out and then resized, as the ``fast`` and ``gpu`` paths do. Each stage is
torchvision's or ours, whichever ``python -m benchmarks.vision_paths`` measured faster (one torch thread,
512 px JPEGs to 224 px, a busy 2-core machine):

- **decoding**: ``torchvision.io.decode_jpeg`` for YCbCr JPEGs, 2.0x PIL's full decode (238 vs 118 images/s);
  PIL (exactly :func:`~deltatune.vision.transforms.to_rgb`) for anything else and for images handed in
  decoded; the pixels are PIL's exactly (the same libjpeg-turbo), every EXIF orientation included;
- **crop and resize**: ours, kept (see :meth:`StandardImageTransform.__call__`);
- **scale and normalise**: ours, kept (see :meth:`StandardImageTransform.normalise`).

End to end (file → normalised tensor) 1.06-1.11x torchvision's own chain (``read_file`` + ``decode_jpeg`` +
``v2.RandomResizedCrop``, flip, ``ToDtype``, ``Normalize``), and 1.6x the PIL path it replaced (full PIL
decode + :class:`~deltatune.vision.transforms.ImageTransform`: 52 vs 84 images/s, interleaved rounds).

Training only: evaluation has one path, PIL's decoding as transformers' ``load_image`` (:mod:`.preprocess`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

from .fast import _resize, decode, open_image
from .transforms import ImageTransform, build_transforms, collate_fn, to_rgb

__all__ = ["StandardImageTransform", "decode_upright"]


def _encoded(source: Any) -> torch.Tensor | None:
    """The encoded bytes of a path, bytes or ``{"bytes", "path"}`` source as a uint8 tensor (None otherwise)."""
    from torchvision.io import read_file

    if isinstance(source, Mapping):
        source = source.get("bytes") if source.get("bytes") is not None else source.get("path")
    if isinstance(source, bytes | bytearray | memoryview):
        return torch.frombuffer(bytearray(source), dtype=torch.uint8)
    if isinstance(source, str | os.PathLike):
        return read_file(os.fspath(source))
    return None


def decode_upright(source: Any) -> torch.Tensor:
    """Decodes an image source to upright RGB pixels, a (3, H, W) uint8 tensor.

    A YCbCr JPEG given as a path or bytes goes to ``torchvision.io.decode_jpeg`` (EXIF orientation applied);
    anything else (PNG, grayscale or CMYK JPEG, a decoded PIL image, ...) is decoded and converted by PIL as
    :func:`~deltatune.vision.transforms.to_rgb` does. The header is read first by PIL, so the
    decompression-bomb limit holds (:func:`~deltatune.vision.preprocess.open_image`).

    Raises:
        ValueError: for more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``, before any is decoded.
        OSError, RuntimeError: when the image cannot be decoded.
    """
    if isinstance(source, Image.Image):
        return _chw(to_rgb(source))
    image = open_image(source)  # header only: size, format, mode
    try:
        data = _encoded(source) if image.format == "JPEG" and image.mode == "RGB" else None
        if data is None:
            return _chw(decode(image, None))
    finally:
        image.close()
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29+ warns on every decode that torchcodec supersedes it
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities")
        pixels = decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    assert isinstance(pixels, torch.Tensor)
    return pixels


def _chw(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


class StandardImageTransform:
    """Image source (path, bytes, ``{"bytes", "path"}`` or PIL image) → normalised float tensor (3, height,
    width), with the training augmentation of ``spec``; picklable.

    Args:
        spec: A training :class:`~deltatune.vision.transforms.ImageTransform` (size, crop ranges, flip,
            statistics).

    Raises:
        ValueError: for an evaluation ``spec`` (evaluation has one path: :mod:`.preprocess`).
    """

    #: Draws its crop and flip from the ``generator`` it is called with (see ``TransformedDataset``).
    accepts_generator = True

    def __init__(self, spec: ImageTransform) -> None:
        if not spec.train:
            raise ValueError(
                "the standard data path's transform trains; evaluation has one path (deltatune.vision.preprocess)"
            )
        self.spec = spec
        mean = torch.tensor(spec.mean if spec.normalize else [0.0] * 3).view(3, 1, 1)
        std = torch.tensor(spec.std if spec.normalize else [1.0] * 3).view(3, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std), -mean / std

    @classmethod
    def from_processor(
        cls, image_processor_or_stats: Any, train: bool = True, **kwargs: Any
    ) -> StandardImageTransform:
        """Like :func:`~deltatune.vision.transforms.build_transforms` (training only)."""
        return cls(build_transforms(image_processor_or_stats, train, **kwargs))

    def collate(self) -> Any:
        """The collate function of its examples (:func:`~deltatune.vision.transforms.collate_fn`)."""
        return collate_fn

    def __repr__(self) -> str:
        return f"StandardImageTransform({self.spec!r})"

    def __call__(self, source: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """Args: source: an image (see :func:`decode_upright`); generator: the randomness of the crop and
        flip (torch's global generator when None). Returns: float32 tensor (3, height, width)."""
        spec = self.spec
        pixels = decode_upright(source)
        left, top, right, bottom = spec.random_crop_box(pixels.shape[2], pixels.shape[1], generator=generator)
        # ours (a slice, then torch's vectorised channels-last uint8 kernel), not v2.functional.resized_crop:
        # 1.26-1.35x its rate on the same boxes (290 vs 215 images/s; benchmarks.vision_paths, "crop + resize")
        out = _resize(pixels[:, top:bottom, left:right].permute(1, 2, 0), *spec.size)  # (H, W, 3) uint8
        if spec.horizontal_flip and torch.rand(1, generator=generator).item() < 0.5:
            out = out.flip(1)
        return self.normalise(out)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """(H, W, 3) uint8 → contiguous (3, H, W) float32 ``(x/255 − mean)/std`` in one pass: ours, not
        ``v2.ToDtype(scale=True)`` + ``v2.Normalize``, which on the resize's channels-last output ran at
        0.30x its rate (374 vs 1256 images/s; ``python -m benchmarks.vision_paths``, "normalise one"; level
        with it on a channels-first tensor)."""
        result = torch.empty(3, pixels.shape[0], pixels.shape[1], dtype=torch.float32)
        return torch.addcmul(self._shift, pixels.permute(2, 0, 1), self._scale, out=result)
