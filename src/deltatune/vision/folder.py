"""Local ``imagefolder`` datasets: one subfolder per class, optionally under ``train/`` and ``validation/``.

    root/cat/001.png  root/dog/xyz.jpg                    → one split (validation carved from it)
    root/train/cat/...  root/validation/cat/...           → two splits ("val", "valid", "test" also work)

Images are opened lazily, so a corrupt file fails only when read (and ``TransformedDataset`` skips it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageOps

from .limits import check_image_pixels

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif"}
)
TRAIN_SPLIT_NAMES = ("train", "training")
EVAL_SPLIT_NAMES = ("validation", "valid", "val", "eval", "test")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def class_directories(root: Path) -> list[Path]:
    """Sorted subfolders of ``root`` that hold at least one image file (at any depth)."""
    found = []
    for child in sorted(root.iterdir()):
        if (
            child.is_dir()
            and not child.name.startswith(".")
            and any(is_image_file(p) for p in child.rglob("*"))
        ):
            found.append(child)
    return found


def check_class_count(root: Path, found: Sequence[str]) -> None:
    """Refuses a training folder with fewer than two classes holding images when it has class folders
    without any (one holding only ``.DS_Store``, say), naming them: they are why it has too few classes.

    Raises:
        ValueError: naming the class folders that hold no image.
    """
    if len(found) >= 2:
        return
    empty = sorted(
        c.name for c in root.iterdir() if c.is_dir() and not c.name.startswith(".") and c.name not in found
    )
    if empty:
        named = ", ".join(repr(n) for n in empty[:5]) + (" ..." if len(empty) > 5 else "")
        has = "has" if len(empty) == 1 else "have"
        raise ValueError(
            f"class{'es' if len(empty) > 1 else ''} {named} in {root} {has} no images; at least two classes with "
            f"images are needed (found {len(found)}: {', '.join(found) or 'none'})"
        )


def find_split_directories(root: Path) -> tuple[Path, Path | None] | None:
    """(train_dir, eval_dir or None) when ``root`` uses the split layout, else None.

    The split layout needs a ``train`` (or ``training``) folder whose own subfolders hold images.
    """
    train_dir = next((root / n for n in TRAIN_SPLIT_NAMES if (root / n).is_dir()), None)
    if train_dir is None or not class_directories(train_dir):
        return None
    eval_dir = next((root / n for n in EVAL_SPLIT_NAMES if (root / n).is_dir()), None)
    return train_dir, eval_dir


class ImageFolderDataset:
    """A map-style split of an image folder: rows ``{"image": PIL.Image, "label": int}``.

    Args:
        files: Image paths.
        labels: Class index of each path.
        class_names: Index → class name.
    """

    def __init__(
        self, files: Sequence[Path | str], labels: Sequence[int], class_names: Sequence[str]
    ) -> None:
        if len(files) != len(labels):
            raise ValueError(f"got {len(files)} files but {len(labels)} labels")
        self.files = [str(f) for f in files]
        self.labels = [int(label) for label in labels]
        self.class_names = list(class_names)

    @classmethod
    def from_directory(cls, root: Path, class_names: Sequence[str] | None = None) -> ImageFolderDataset:
        """Scans ``root/<class>/**/<image>``; ``class_names`` fixes the label order (default: sorted names).

        Raises:
            ValueError: if a class folder is not in ``class_names``.
        """
        directories = class_directories(root)
        names = list(class_names) if class_names is not None else [d.name for d in directories]
        index = {name: i for i, name in enumerate(names)}
        files: list[Path] = []
        labels: list[int] = []
        for directory in directories:
            if directory.name not in index:
                raise ValueError(
                    f"class folder {directory} is not among the training classes {names}; every evaluation "
                    "class needs a training folder of the same name"
                )
            for path in sorted(p for p in directory.rglob("*") if is_image_file(p)):
                files.append(path)
                labels.append(index[directory.name])
        return cls(files, labels, names)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        try:
            with Image.open(path) as handle:
                check_image_pixels(handle, path)
                handle.load()
                image = ImageOps.exif_transpose(handle)  # a loaded copy, upright
        except Exception as error:
            raise OSError(f"cannot read image {path}: {error}") from error
        return {"image": image, "label": self.labels[index]}

    def subset(self, indices: Sequence[int]) -> ImageFolderDataset:
        """A new split holding the rows at ``indices``."""
        return ImageFolderDataset(
            [self.files[i] for i in indices], [self.labels[i] for i in indices], self.class_names
        )

    def __repr__(self) -> str:
        return f"ImageFolderDataset(num_rows={len(self)}, num_classes={len(self.class_names)})"


def check_fraction(validation_split: float) -> None:
    """Raises ``ValueError`` unless ``0 < validation_split < 1``."""
    if not 0.0 < validation_split < 1.0:
        raise ValueError(f"validation_split must be in (0, 1), got {validation_split}")


def stratified_split(
    labels: Sequence[int], validation_split: float, seed: int
) -> tuple[list[int], list[int]]:
    """(train indices, eval indices): about ``validation_split`` of each class goes to eval.

    Classes with a single example stay in train (and are not evaluated: a warning names them); at least
    one example goes to eval overall -- when every class has a single example that moves one class out of
    training entirely, which is refused.

    Raises:
        ValueError: when no evaluation example can be carved without removing a class from training.
    """
    check_fraction(validation_split)
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels)
    train: list[int] = []
    evaluation: list[int] = []
    single: list[int] = []
    for label in np.unique(labels_array):
        rows = rng.permutation(np.flatnonzero(labels_array == label)).tolist()
        n_eval = round(len(rows) * validation_split) if len(rows) > 1 else 0
        n_eval = min(n_eval, len(rows) - 1) if len(rows) > 1 else 0
        if len(rows) == 1:
            single.append(int(label))
        evaluation.extend(rows[:n_eval])
        train.extend(rows[n_eval:])
    if not evaluation and len(train) > 1:
        several = [i for i in train if int(labels_array[i]) not in single]
        if not several:
            raise ValueError(
                "every class has a single image, so a validation split would take a class out of training "
                "entirely; add images (at least 2 per class) or a validation/ folder"
            )
        evaluation.append(several[int(rng.integers(len(several)))])
        train.remove(evaluation[-1])
    if single:
        logger.warning(
            "%d class(es) have a single image (label ids %s): it stays in training and the class is not "
            "evaluated; add images to evaluate it",
            len(single),
            single[:10],
        )
    return sorted(train), sorted(evaluation)


#: The key under which an evaluation batch carries the names of the images it dropped as unreadable (from
#: whichever process collated it: the dataset that found them there is a DataLoader worker's copy).
SKIPPED_KEY = "skipped_images"


class Unreadable(NamedTuple):
    """What an evaluation dataset returns for a row whose image cannot be read: its name (:func:`row_name`);
    the collate drops the row and puts the name in the batch (:data:`SKIPPED_KEY`)."""

    name: str


def row_name(dataset: Any, index: int) -> str:
    """The file behind row ``index`` of ``dataset`` (through subsets; a row whose image is a path names it),
    or ``"example <index>"``."""
    original = index
    while True:
        files = getattr(dataset, "files", None)
        if files is not None:
            return str(files[index])
        indices = getattr(dataset, "indices", None)
        inner = getattr(dataset, "dataset", None)
        if inner is None:
            break
        dataset, index = inner, (indices[index] if indices is not None else index)
    try:
        image = dataset[index].get("image")
    except Exception:  # the row itself cannot be read
        image = None
    if isinstance(image, str | os.PathLike):
        return os.fspath(image)
    if isinstance(image, Mapping) and image.get("path"):
        return str(image["path"])
    return f"example {original}"
