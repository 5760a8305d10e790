"""``deltatune evaluate``'s data and results: which images are scored (every image of a folder, or the run's own
evaluation split), classes matched to the adapter's labels by name, metrics accumulated batch by batch, and
result files that never replace a run's own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._files import read_json, write_json
from ..train.metrics import ClassificationReport, report_from_confusion
from ..train.outputs import EVALUATE_DIR, EVALUATE_FILES

logger = logging.getLogger(__name__)

__all__ = [
    "PROTECTED_RESULTS",
    "EvaluationData",
    "StreamingReport",
    "evaluation_data",
    "results_folder",
    "write_evaluation",
]

#: The files a training run writes that ``evaluate`` replaces only when told (``--overwrite``); the files it
#: writes (``train --overwrite_output_dir`` removes them with the run, the ``evaluate/`` folder included).
PROTECTED_RESULTS = EVALUATE_FILES
_MAX_NAMES = 10


@dataclass
class EvaluationData:
    """What ``evaluate`` scores.

    Attributes:
        rows: Map-style rows ``{"image", "label"}`` whose labels are the adapter's class ids.
        dataset: The dataset as named in the results (a folder, a hub id).
        description: One line saying which images these are and where that choice came from.
    """

    rows: Any
    dataset: str
    description: str


class RelabeledRows:
    """``rows`` with each label mapped through ``mapping`` (the dataset's class id → the adapter's)."""

    def __init__(self, rows: Any, mapping: Sequence[int]) -> None:
        self.dataset = rows
        self.mapping = [int(m) for m in mapping]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = dict(self.dataset[index])
        row["label"] = self.mapping[int(row["label"])]
        return row


def match_classes(names: Sequence[str], labels: Sequence[str], source: str) -> list[int]:
    """The adapter's class id of each of ``names`` (a dataset's classes), matched by name.

    Raises:
        ValueError: naming the classes the adapter does not know.
    """
    index = {name: i for i, name in enumerate(labels)}
    unknown = [n for n in names if n not in index]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:_MAX_NAMES]) + (
            " ..." if len(unknown) > _MAX_NAMES else ""
        )
        known = ", ".join(repr(n) for n in list(labels)[:_MAX_NAMES]) + (
            " ..." if len(labels) > _MAX_NAMES else ""
        )
        raise ValueError(
            f"{source}: {len(unknown)} class(es) the adapter was not trained on: {shown}; its labels are {known}. "
            "Classes are matched by name: name the folders as the training classes"
        )
    return [index[n] for n in names]


def _folder_rows(root: Path, labels: Sequence[str]) -> Any:
    from ..vision.folder import ImageFolderDataset, class_directories

    names = [d.name for d in class_directories(root)]
    if not names:
        raise ValueError(f"no class folders with images in {root}: expected {root}/<class>/<image>")
    match_classes(names, labels, str(root))
    return ImageFolderDataset.from_directory(root, class_names=list(labels))


def evaluation_data(
    labels: Sequence[str],
    record: dict[str, Any],
    dataset: str | None = None,
    validation_dir: str | None = None,
    **options: Any,
) -> EvaluationData:
    """The images ``evaluate`` scores.

    ``validation_dir``, or a local image folder as ``dataset``: every image in it (of a ``train/`` +
    ``validation/`` folder, the validation folder). A hub id or saved dataset: its evaluation split. Neither:
    the run's own evaluation split, rebuilt from its run record (same split, seed and sample cap), so the
    accuracy is the one the run reported. Classes are matched to ``labels`` by name.

    Args:
        labels: The adapter's class names, in id order.
        record: The adapter's run record (``deltatune_run.json``; may be empty).
        dataset: ``--dataset``.
        validation_dir: ``--validation_dir``.
        options: ``image_column``, ``label_column``, ``validation_split``, ``max_eval_samples`` (None: the
            run record's).

    Raises:
        ValueError: for an unknown class name, a missing folder, or no dataset at all.
    """
    from ..vision import is_image_folder, limit_samples, load_image_dataset
    from ..vision.folder import find_split_directories

    folder: Path | None = None
    named, what = "", ""
    if validation_dir is not None:
        folder = Path(validation_dir).expanduser()
        if not folder.is_dir():
            raise ValueError(f"--validation_dir {validation_dir!r} is not a directory")
        named, what = validation_dir, f"every image of {validation_dir}"
    elif dataset is not None:
        root = Path(dataset).expanduser()
        if is_image_folder(root):
            layout = find_split_directories(root)
            folder = layout[1] if layout is not None and layout[1] is not None else root
            named = dataset
            what = f"every image of {folder}" + (" (its validation folder)" if folder != root else "")
    if folder is not None:
        rows = _folder_rows(folder, labels)
        cap = options.get("max_eval_samples")
        if cap is not None and cap < len(rows):  # the images the run's cap picks (same seed, same draw)
            rows = limit_samples(rows, cap, int(record.get("seed", 42)), "eval")
            what = f"{cap} random images of {folder} (--max_eval_samples)"
        return EvaluationData(rows, named, what)
    from_record = dataset is None
    name = dataset if dataset is not None else record.get("dataset")
    if not name:
        raise ValueError(
            "the adapter has no run record (deltatune_run.json) naming its dataset; pass --dataset"
        )

    def option(key: str, default: Any = None) -> Any:
        given = options.get(key)
        return given if given is not None else (record.get(key, default) if from_record else default)

    bundle = load_image_dataset(
        str(name),
        image_column=option("image_column"),
        label_column=option("label_column"),
        validation_split=option("validation_split", 0.1),
        seed=int(record.get("seed", 42)),
        max_eval_samples=option("max_eval_samples"),
        validation_dir=record.get("validation_dir") if from_record else None,
    )
    mapping = match_classes(bundle.class_names, labels, str(name))
    rows = bundle.eval if mapping == list(range(len(mapping))) else RelabeledRows(bundle.eval, mapping)
    where = "the evaluation split of"
    if from_record:
        return EvaluationData(
            rows, str(name), f"{where} {name}, as recorded in the adapter's run record (deltatune_run.json)"
        )
    return EvaluationData(rows, str(name), f"{where} {name}")


class StreamingReport:
    """Accuracy, top-5 and the confusion matrix accumulated one batch at a time (memory flat in the number of
    images: nothing per image is kept).

    Args:
        class_names: The adapter's classes in id order.
    """

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)
        n = len(self.class_names)
        self.confusion = np.zeros((n, n), dtype=np.int64)
        self.top5_hits = 0
        self._loss_sum = 0.0
        self._scored = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Adds a batch: (B, C) scores and (B,) class ids."""
        predicted = logits.argmax(dim=-1).cpu().numpy()
        truth = labels.cpu().numpy().astype(np.int64)
        np.add.at(self.confusion, (truth, predicted), 1)
        losses = torch.nn.functional.cross_entropy(logits.float(), labels.to(logits.device), reduction="sum")
        self._loss_sum += float(losses)
        self._scored += len(truth)
        if len(self.class_names) > 5:
            top5 = logits.topk(5, dim=-1).indices.cpu()
            self.top5_hits += int((top5 == labels.cpu().view(-1, 1)).any(dim=-1).sum())

    @property
    def mean_loss(self) -> float | None:
        """The mean cross-entropy of the images added (a training run's ``eval_loss``), None before any."""
        return self._loss_sum / self._scored if self._scored else None

    def report(self) -> ClassificationReport:
        """The :class:`ClassificationReport`, as the run's own evaluation reports it
        (:func:`~deltatune.train.metrics.report_from_confusion`: every class listed)."""
        top5 = self.top5_hits if len(self.class_names) > 5 else None
        return report_from_confusion(self.confusion, top5, self.class_names)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, looked up once per process (None where there is none)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hands memory glibc's allocator keeps after freeing back to the system (``malloc_trim``): decoding
    images of many sizes fragments the heap, and a long evaluation's resident memory would otherwise grow
    with the number of images. A no-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def results_folder(adapter_dir: str, output_dir: str | None, overwrite: bool) -> str:
    """Where ``evaluate`` writes, checked before any work: ``output_dir`` when given; else the adapter folder
    when it holds no results (:data:`PROTECTED_RESULTS`) or ``overwrite`` is on, else ``<adapter>/evaluate``.

    Raises:
        ValueError: (without ``overwrite``) when that folder already holds result files -- a training run's,
            an earlier evaluation's, whoever's -- naming the folder, the files and the way out; or when it is
            a file.
    """
    if output_dir is None and not overwrite and _results_in(adapter_dir):
        out = os.path.join(adapter_dir, EVALUATE_DIR)
    else:
        out = adapter_dir if output_dir is None else output_dir
    if output_dir is not None and os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"the results folder {out!r} is a file; pass a folder as --output_dir")
    held = _results_in(out)
    if held and not overwrite:
        replace = "--overwrite" if output_dir is not None else f"--output_dir {out!r} --overwrite"
        raise ValueError(
            f"{out!r} already holds results this evaluation would replace ({', '.join(held)}); "
            f"pass {replace} to replace them, or another --output_dir"
        )
    return out


def _results_in(folder: str) -> list[str]:
    """The result files of :data:`PROTECTED_RESULTS` that ``folder`` holds."""
    return [n for n in PROTECTED_RESULTS if os.path.lexists(os.path.join(folder, n))]


def write_evaluation(out: str, results: dict[str, Any], run_dir: str) -> list[str]:
    """Writes ``eval_results.json`` and ``all_results.json``; returns the paths. ``all_results.json`` holds this
    evaluation's keys only -- two evaluations, or two runs, never mix -- except in the run's own folder
    (``run_dir``), where the run's other keys (``train_*``) stay beside them, as the run wrote them."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "eval_results.json")
    write_json(path, results, sort_keys=True)
    combined_path = os.path.join(out, "all_results.json")
    combined: dict[str, Any] = {}
    if os.path.isfile(combined_path) and os.path.isdir(run_dir) and os.path.samefile(out, run_dir):
        previous = read_json(combined_path, "all_results.json")
        if isinstance(previous, dict):
            combined = {k: v for k, v in previous.items() if not k.startswith("eval_")}
    combined.update({k: v for k, v in results.items() if not isinstance(v, dict | list)})
    write_json(combined_path, combined, sort_keys=True)
    return [path, combined_path]
