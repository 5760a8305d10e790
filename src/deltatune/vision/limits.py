"""Bounds on what an image processor config or an image file may ask for, checked before any pixel is
allocated: a processor from someone else's folder asking for 20000 × 20000 inputs, or a statistic that turns
every pixel into inf (``image_std: [0, 0, 0]``), fails at once naming the file, and so does an image whose
header promises more pixels than PIL's decompression-bomb limit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from PIL import Image

__all__ = ["MAX_IMAGE_SIDE", "check_image_pixels", "check_image_processor"]

#: Largest height or width an image processor may resize to (real models use up to ~1500 px).
MAX_IMAGE_SIDE = 4096
_SIZE_KEYS = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")


def _get(source: Any, key: str) -> Any:
    return source.get(key) if isinstance(source, Mapping) else getattr(source, key, None)


def _sides(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [value[k] for k in _SIZE_KEYS if value.get(k) is not None]
    if any(hasattr(value, k) for k in _SIZE_KEYS):  # transformers' SizeDict
        return [getattr(value, k) for k in _SIZE_KEYS if getattr(value, k, None) is not None]
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def check_image_processor(processor: Any, source: str) -> None:
    """Raises ``ValueError`` (naming ``source``, e.g. ``"DIR/preprocessor_config.json"``) when the processor's
    ``size``/``crop_size`` exceed :data:`MAX_IMAGE_SIDE` or are not positive integers, or its ``image_mean``/
    ``image_std`` are not finite (``image_std`` must be > 0 when it normalises)."""
    for key in ("size", "crop_size"):
        for side in _sides(_get(processor, key)):
            if isinstance(side, bool) or not isinstance(side, int | float) or not 0 < side <= MAX_IMAGE_SIDE:
                raise ValueError(
                    f"{source}: {key} asks for {side!r} pixels per side; allowed: 1..{MAX_IMAGE_SIDE} (a larger "
                    "size would allocate gigabytes per image); fix the processor config"
                )
    if _get(processor, "do_normalize") is False:
        return
    for key in ("image_mean", "image_std"):
        value = _get(processor, key)
        values = list(value) if isinstance(value, list | tuple) else [] if value is None else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"{source}: {key} holds {v!r}; it must be finite numbers")
            if key == "image_std" and v <= 0:
                raise ValueError(
                    f"{source}: image_std holds {v!r}; it must be > 0 (it divides every pixel, and 0 makes the "
                    "model's inputs infinite)"
                )


def check_image_pixels(image: Image.Image, source: str) -> None:
    """Raises ``ValueError`` when ``image`` (opened, not yet decoded) has more pixels than PIL's
    ``Image.MAX_IMAGE_PIXELS`` (about 89 million by default), before it is decoded."""
    limit = Image.MAX_IMAGE_PIXELS or 89_478_485
    width, height = image.size
    if width * height > limit:
        raise ValueError(
            f"{source}: {width} x {height} pixels is more than the {limit:,} allowed (PIL.Image.MAX_IMAGE_PIXELS); "
            "refused before decoding"
        )
