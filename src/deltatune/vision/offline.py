"""The bundled offline default: real handwritten digits and a small ViT pretrained on rendered font glyphs.

Dataset: the UCI optdigits test set as shipped by scikit-learn (1797 images from 13 writers, 8x8, 17 grey
levels; CC BY 4.0, see ``data/README.md``), split 1000 train (100 per class) / 797 validation. Each image is
served upscaled (bilinear) to 32x32 grayscale, white ink on black.

Backbone: ``assets/vit-glyphs-32`` — a ViT (image 32, patch 8, hidden 128, 6 layers) pretrained by
``scripts/pretrain_backbone.py`` to recognise Latin letters rendered in the fonts matplotlib ships, as sharp
size-normalised 32x32 bitmaps. It never saw a digit: fine-tuning it on blurry handwritten digits is real
transfer, checked by ``scripts/check_transfer.py`` against a linear probe and a random backbone.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .._defaults import (  # noqa: F401 - plain values shared with the help, defined in one place
    OFFLINE_ALIASES,
    OFFLINE_BACKBONE_ID,
    OFFLINE_BACKBONE_NAME,
    OFFLINE_DEFAULT,
    OFFLINE_TRAINING_DEFAULTS,
)

_PACKAGE_DIR = Path(str(resources.files("deltatune.vision")))
OFFLINE_BACKBONE_DIR = _PACKAGE_DIR / "assets" / OFFLINE_BACKBONE_NAME
DIGITS_FILE = _PACKAGE_DIR / "data" / "digits.npz"
DIGIT_IMAGE_SIZE = 32
DIGIT_CLASS_NAMES = [str(d) for d in range(10)]


def is_offline_default(name_or_path: str) -> bool:
    """True for the names of the bundled dataset/model ('offline-default', 'offline_default', 'offline')."""
    return name_or_path.strip().lower() in OFFLINE_ALIASES


def offline_default_model_dir() -> str:
    """Path of the bundled pretrained backbone (a transformers model directory).

    Raises:
        FileNotFoundError: if the assets are missing (rebuild them with ``scripts/pretrain_backbone.py``).
    """
    if not (OFFLINE_BACKBONE_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the bundled backbone is missing from {OFFLINE_BACKBONE_DIR}; rebuild it with "
            "`python scripts/pretrain_backbone.py` from a source checkout"
        )
    return str(OFFLINE_BACKBONE_DIR)


def is_bundled_backbone(name_or_path: str) -> bool:
    """True for the bundled backbone's id, the offline aliases, or a path to a (possibly moved) install of it.

    A path counts when its last component is the backbone's name and it does not exist here, or it is the
    installed copy itself; a user folder that happens to share the name is left alone.
    """
    text = str(name_or_path).strip()
    if text in (OFFLINE_BACKBONE_ID, OFFLINE_BACKBONE_NAME) or is_offline_default(text):
        return not Path(text).exists()
    path = Path(text).expanduser()
    if path.name != OFFLINE_BACKBONE_NAME:
        return False
    if not path.exists():
        return path.is_absolute() and path.parent.name == "assets"  # an install elsewhere (another machine)
    return path.resolve() == OFFLINE_BACKBONE_DIR.resolve()


def resolve_model_path(name_or_path: str) -> str:
    """Where to load ``name_or_path`` from: the installed bundled backbone for its id
    (``deltatune/vit-glyphs-32``), the offline aliases or a moved install path; anything else unchanged.

    Example:
        >>> from transformers import AutoModelForImageClassification
        >>> from deltatune.vision import resolve_model_path
        >>> model = AutoModelForImageClassification.from_pretrained(resolve_model_path("deltatune/vit-glyphs-32"))
    """
    return offline_default_model_dir() if is_bundled_backbone(name_or_path) else name_or_path


def digit_to_image(values: np.ndarray) -> Image.Image:
    """An 8x8 optdigits array (0..16) → a 32x32 grayscale PIL image (bilinear upscaling)."""
    pixels = np.clip(np.rint(values.astype(np.float32) * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="L").resize(
        (DIGIT_IMAGE_SIZE, DIGIT_IMAGE_SIZE), Image.Resampling.BILINEAR
    )


class DigitsDataset:
    """One split of the bundled digits: rows ``{"image": PIL.Image (L, 32x32), "label": int}``.

    Args:
        split: "train" (1000 images) or "validation" (797 images).
        path: The ``.npz`` file (default: the bundled one).
    """

    def __init__(self, split: str = "train", path: str | Path | None = None) -> None:
        if split not in ("train", "validation"):
            raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
        source = Path(path) if path is not None else DIGITS_FILE
        if not source.is_file():
            raise FileNotFoundError(
                f"the bundled digits are missing from {source}; rebuild them with `python scripts/export_digits.py`"
            )
        with np.load(source, allow_pickle=False) as archive:
            keep = archive["validation"] == (1 if split == "validation" else 0)
            self.images: np.ndarray = archive["images"][keep]
            self.labels: np.ndarray = archive["labels"][keep].astype(np.int64)
        self.split = split
        self.class_names = list(DIGIT_CLASS_NAMES)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": digit_to_image(self.images[index]), "label": int(self.labels[index])}

    def __repr__(self) -> str:
        return f"DigitsDataset(split={self.split!r}, num_rows={len(self)})"
