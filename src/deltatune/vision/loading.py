"""``load_image_dataset``: a hub id, a local folder or the bundled offline default → train/eval splits.

Every split is a map-style dataset whose rows are ``{"image": PIL.Image, "label": int}``, whatever the
source's own column names, with ``label2id``/``id2label`` built from the class names.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .folder import (
    EVAL_SPLIT_NAMES,
    ImageFolderDataset,
    check_class_count,
    check_fraction,
    class_directories,
    find_split_directories,
    stratified_split,
)
from .offline import DigitsDataset, is_offline_default
from .preprocess import open_image

logger = logging.getLogger(__name__)

IMAGE_COLUMN_CANDIDATES = ("image", "img", "images", "pixel_values", "picture", "photo", "jpg", "png")
DATA_FILE_SUFFIXES = frozenset({".parquet", ".arrow", ".csv", ".jsonl", ".json"})
LABEL_COLUMN_CANDIDATES = (
    "label",
    "labels",
    "fine_label",
    "coarse_label",
    "class",
    "category",
    "target",
    "y",
)


@dataclass
class ImageDatasetBundle:
    """Train and evaluation splits plus label maps.

    Attributes:
        train: Map-style dataset of ``{"image": PIL.Image, "label": int}`` rows.
        eval: Same, for evaluation.
        label2id: Class name → index.
        id2label: Index → class name.
        image_column: The image column in the source (rows always use the key "image").
        label_column: The label column in the source (rows always use the key "label").
    """

    train: Any
    eval: Any
    label2id: dict[str, int]
    id2label: dict[int, str]
    image_column: str = "image"
    label_column: str = "label"

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def class_names(self) -> list[str]:
        return [self.id2label[i] for i in range(len(self.id2label))]


class SubsetDataset:
    """The rows of ``dataset`` at ``indices`` (map-style, picklable)."""

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]


class HubSplit:
    """A ``datasets.Dataset`` seen as ``{"image": PIL.Image, "label": int}`` rows.

    Args:
        dataset: The split (only the two columns are read).
        image_column: Source column of the images (PIL images, paths, or ``{"bytes", "path"}`` dicts).
        label_column: Source column of the labels.
        label_map: Maps raw label values (e.g. strings) to indices; None when they already are indices.
    """

    def __init__(
        self,
        dataset: Any,
        image_column: str,
        label_column: str,
        label_map: Mapping[Any, int] | None = None,
    ) -> None:
        self.dataset = dataset.select_columns([image_column, label_column])
        self.image_column = image_column
        self.label_column = label_column
        self.label_map = dict(label_map) if label_map is not None else None

    def __len__(self) -> int:
        return len(self.dataset)

    def undecoded(self) -> HubSplit:
        """This split with a ``datasets.Image`` column left undecoded (rows then hold lazily opened images,
        which :class:`~deltatune.vision.fast.FastImageTransform` decodes at reduced size); ``self`` when
        the column is not an ``Image`` feature or is undecoded already."""
        feature = self.dataset.features.get(self.image_column)
        if type(feature).__name__ != "Image" or getattr(feature, "decode", True) is False:
            return self
        clone = copy.copy(self)
        clone.dataset = self.dataset.cast_column(self.image_column, type(feature)(decode=False))
        return clone

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.dataset[int(index)]
        image = row[self.image_column]
        if isinstance(image, str | Mapping):
            image = open_image(image)  # the decompression-bomb limit, before decoding
        label = row[self.label_column]
        return {"image": image, "label": self.label_map[label] if self.label_map is not None else int(label)}


def detect_columns(
    column_names: Sequence[str],
    features: Mapping[str, Any] | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    dataset_name: str = "the dataset",
) -> tuple[str, str]:
    """Finds the image and label columns, by feature type first and then by usual names.

    Raises:
        ValueError: naming the columns found and the ``--image_column``/``--label_column`` flags.
    """
    columns = list(column_names)
    features = features or {}

    def pick(requested: str | None, kind: str, feature_type: str, candidates: Sequence[str]) -> str:
        flag = f"--{kind}_column"
        if requested is not None:
            if requested not in columns:
                raise ValueError(
                    f"{kind} column {requested!r} not found in {dataset_name}; columns found: {columns}. "
                    f"Pass one of them with {flag} ({kind}_column=...)"
                )
            return requested
        typed = [c for c in columns if type(features.get(c)).__name__ == feature_type]
        if len(typed) == 1:
            return typed[0]
        lowered = {c.lower(): c for c in columns}
        for candidate in candidates:
            if candidate in lowered:
                return lowered[candidate]
        if typed:
            return typed[0]
        raise ValueError(
            f"could not find the {kind} column in {dataset_name}; columns found: {columns}. "
            f"Name it with {flag} ({kind}_column=...); looked for {list(candidates)}"
        )

    image = pick(image_column, "image", "Image", IMAGE_COLUMN_CANDIDATES)
    label = pick(label_column, "label", "ClassLabel", LABEL_COLUMN_CANDIDATES)
    if image == label:
        raise ValueError(f"image and label columns must differ, both are {image!r}; columns found: {columns}")
    return image, label


def limit_samples(dataset: Any, max_samples: int | None, seed: int, split: str) -> Any:
    """``max_samples`` random rows of ``dataset`` in their order (all of them when None or not fewer): the
    ``max_train_samples``/``max_eval_samples`` cap of a run, which ``deltatune evaluate`` reuses so that it
    picks the run's images.

    Args:
        dataset: Map-style rows.
        max_samples: The cap (None: no cap).
        seed: The run's seed; the evaluation split draws with ``seed + 1`` (so the two caps are independent).
        split: ``"train"`` or ``"eval"``.

    Raises:
        ValueError: for a cap that is not positive.
    """
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    if max_samples <= 0:
        raise ValueError(f"max_{split}_samples must be positive, got {max_samples}")
    indices = np.random.default_rng(seed + 1 if split == "eval" else seed).permutation(len(dataset))
    indices = indices[:max_samples]
    if isinstance(dataset, ImageFolderDataset):
        return dataset.subset(sorted(indices.tolist()))
    return SubsetDataset(dataset, sorted(indices.tolist()))


def _label_maps(class_names: Sequence[str]) -> tuple[dict[str, int], dict[int, str]]:
    names = [str(n) for n in class_names]
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique, got {names}")
    return {n: i for i, n in enumerate(names)}, dict(enumerate(names))


def _validation_folder(root: Path, class_names: Sequence[str]) -> ImageFolderDataset:
    """The validation split of a folder, warning when it lacks a training class (whose accuracy then goes
    unmeasured)."""
    evaluation = ImageFolderDataset.from_directory(root, class_names)
    present = set(evaluation.labels)
    missing = [n for i, n in enumerate(class_names) if i not in present]
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        logger.warning(
            "the validation folder %s has no images of %d training class(es): %s; their accuracy is not measured",
            root,
            len(missing),
            shown,
        )
    return evaluation


def _load_folder(
    root: Path, validation_split: float, seed: int, validation_dir: Path | None = None
) -> tuple[Any, Any, list[str]]:
    layout = find_split_directories(root)
    if layout is not None:
        train_dir, eval_dir = layout
        train = ImageFolderDataset.from_directory(train_dir)
        check_class_count(train_dir, train.class_names)
        eval_dir = validation_dir or eval_dir
        if eval_dir is not None:
            return train, _validation_folder(eval_dir, train.class_names), train.class_names
    else:
        if not class_directories(root):
            raise ValueError(
                f"no class folders with images in {root}: expected root/<class>/<image>.png (one folder per "
                f"class) or root/train/<class>/... with root/validation/<class>/... ({'/'.join(EVAL_SPLIT_NAMES)})"
            )
        train = ImageFolderDataset.from_directory(root)
        check_class_count(root, train.class_names)
    if validation_dir is not None:
        return train, _validation_folder(validation_dir, train.class_names), train.class_names
    train_idx, eval_idx = stratified_split(train.labels, validation_split, seed)
    return train.subset(train_idx), train.subset(eval_idx), train.class_names


def _is_saved_hf_dataset(root: Path) -> bool:
    return (root / "dataset_dict.json").is_file() or (root / "state.json").is_file()


def is_image_folder(path: str | Path) -> bool:
    """True for a local folder of class folders (or ``train/``+``validation/`` ones): a directory that is
    neither a saved ``datasets`` dataset nor a local copy of a hub dataset's data files."""
    root = Path(path).expanduser()
    return root.is_dir() and not _is_saved_hf_dataset(root) and not _holds_data_files(root)


def _holds_data_files(root: Path) -> bool:
    """True for a local copy of a hub dataset (parquet/arrow/csv/json files), which ``load_dataset`` reads."""
    for folder in (root, root / "data"):
        if folder.is_dir() and any(
            p.suffix.lower() in DATA_FILE_SUFFIXES for p in folder.iterdir() if p.is_file()
        ):
            return True
    return False


def _load_hub(
    name_or_path: str,
    image_column: str | None,
    label_column: str | None,
    validation_split: float,
    seed: int,
) -> tuple[Any, Any, list[str], str, str]:
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - datasets is a dependency
        raise ImportError(
            "loading hub datasets needs the `datasets` package: pip install datasets"
        ) from error
    if Path(name_or_path).is_dir() and _is_saved_hf_dataset(Path(name_or_path)):
        loaded = datasets.load_from_disk(name_or_path)
    else:
        try:
            loaded = datasets.load_dataset(name_or_path)
        except Exception as error:
            raise ValueError(
                f"could not load dataset {name_or_path!r} with datasets.load_dataset ({type(error).__name__}: "
                f"{error}). Without network, pass a local image folder (one subfolder per class) or "
                "'offline-default' (the bundled digits)"
            ) from error
    if isinstance(loaded, datasets.Dataset):
        splits: dict[str, Any] = {"train": loaded}
    else:
        splits = dict(loaded)
    train_name = "train" if "train" in splits else (next(iter(splits)) if len(splits) == 1 else None)
    if train_name is None:
        raise ValueError(f"dataset {name_or_path!r} has no 'train' split; splits found: {sorted(splits)}")
    train = splits[train_name]
    image, label = detect_columns(
        train.column_names, train.features, image_column, label_column, repr(name_or_path)
    )
    eval_name = next((n for n in EVAL_SPLIT_NAMES if n in splits and n != train_name), None)
    feature = train.features.get(label)
    if eval_name is not None:
        evaluation = splits[eval_name]
        missing = [c for c in (image, label) if c not in evaluation.column_names]
        if missing:
            raise ValueError(f"split {eval_name!r} lacks columns {missing}; it has {evaluation.column_names}")
    else:
        check_fraction(validation_split)
        stratify = label if type(feature).__name__ == "ClassLabel" else None
        try:
            parts = train.train_test_split(test_size=validation_split, seed=seed, stratify_by_column=stratify)
        except ValueError:
            parts = train.train_test_split(test_size=validation_split, seed=seed)
        train, evaluation = parts["train"], parts["test"]
    label_map: dict[Any, int] | None = None
    if type(feature).__name__ == "ClassLabel":
        class_names = list(feature.names)
        seen = set(train.unique(label)) | set(evaluation.unique(label))
        outside = sorted(int(v) for v in seen if not 0 <= int(v) < len(class_names))
        if outside:
            raise ValueError(
                f"label column {label!r} holds {outside[:5]}, outside the label map 0..{len(class_names) - 1} "
                f"({len(class_names)} classes: {class_names[:5]}...); unlabeled rows (often -1) must be "
                "dropped before training, or pick another --label_column"
            )
    else:
        values = sorted(
            set(train.unique(label)) | set(evaluation.unique(label)), key=lambda v: (str(type(v)), v)
        )
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            if min(values) < 0:
                raise ValueError(
                    f"label column {label!r} has negative values {values[:5]}; labels must be 0..n-1"
                )
            class_names = [str(i) for i in range(int(max(values)) + 1)]
        else:
            class_names = [str(v) for v in values]
            label_map = {v: i for i, v in enumerate(values)}
    return (
        HubSplit(train, image, label, label_map),
        HubSplit(evaluation, image, label, label_map),
        class_names,
        image,
        label,
    )


def load_image_dataset(
    name_or_path: str = "offline-default",
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    validation_split: float = 0.1,
    seed: int = 42,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    validation_dir: str | None = None,
) -> ImageDatasetBundle:
    """Loads an image-classification dataset as train/eval splits with label maps.

    Args:
        name_or_path: "offline-default" (bundled handwritten digits, with its own fixed validation split), a
            local image folder (one subfolder per class, or ``train/`` + ``validation/`` folders), a
            directory written by ``datasets.Dataset.save_to_disk``, or a Hugging Face Hub dataset id such as
            "food101" (loaded with ``datasets.load_dataset``).
        image_column: Image column of a hub dataset (auto-detected when None).
        label_column: Label column of a hub dataset (auto-detected when None).
        validation_split: Fraction of train carved out for evaluation when the source has no
            validation/test split (stratified by label when possible).
        seed: Seed of the carved split and of the ``max_*_samples`` subsets.
        max_train_samples: Keep a random subset of this many training rows.
        max_eval_samples: Keep a random subset of this many evaluation rows.
        validation_dir: A separate image folder (one subfolder per class, named as in training) to
            evaluate on, for a folder ``name_or_path``; nothing is then carved from the training images.

    Returns:
        An :class:`ImageDatasetBundle`; rows are ``{"image": PIL.Image, "label": int}``.

    Raises:
        ValueError: on an unknown source, undetectable columns, a bad fraction or an empty split.
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"name_or_path must be a dataset id or a directory, got {name_or_path!r}")
    image_source, label_source = "image", "label"
    path = Path(name_or_path).expanduser()
    offline = is_offline_default(name_or_path) and not path.exists()
    folder = is_image_folder(path)
    if validation_dir is not None and (offline or not folder):
        raise ValueError(
            f"validation_dir needs a local image folder to train on, not {name_or_path!r} (a hub dataset or "
            "the bundled digits bring their own validation split)"
        )
    if offline:
        train: Any = DigitsDataset("train")
        evaluation: Any = DigitsDataset("validation")
        class_names = train.class_names
    elif folder:
        eval_dir = None if validation_dir is None else Path(validation_dir).expanduser()
        if eval_dir is not None and not eval_dir.is_dir():
            raise ValueError(f"validation_dir {validation_dir!r} is not a directory")
        train, evaluation, class_names = _load_folder(path, validation_split, seed, eval_dir)
    elif path.is_file():
        raise ValueError(f"{name_or_path!r} is a file; pass a directory of class folders or a dataset id")
    else:
        if name_or_path.startswith((".", "/", "~")) and not path.exists():
            raise ValueError(f"directory {name_or_path!r} does not exist")
        train, evaluation, class_names, image_source, label_source = _load_hub(
            name_or_path, image_column, label_column, validation_split, seed
        )
    train = limit_samples(train, max_train_samples, seed, "train")
    evaluation = limit_samples(evaluation, max_eval_samples, seed, "eval")
    for split, data in (("train", train), ("eval", evaluation)):
        if len(data) == 0:
            raise ValueError(
                f"the {split} split of {name_or_path!r} is empty; check the folder layout or the split "
                f"names, or raise validation_split (now {validation_split})"
            )
    if len(class_names) < 2:
        raise ValueError(
            f"{name_or_path!r} has {len(class_names)} class ({', '.join(map(str, class_names))}); a classifier "
            "needs at least 2 (with one output transformers treats the head as regression). Add a folder per class"
        )
    label2id, id2label = _label_maps(class_names)
    logger.info(
        "loaded %s: %d train / %d eval images, %d classes",
        name_or_path,
        len(train),
        len(evaluation),
        len(class_names),
    )
    return ImageDatasetBundle(train, evaluation, label2id, id2label, image_source, label_source)
