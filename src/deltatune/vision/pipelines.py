"""The image data paths a run can take, built from a dataset bundle: ``fast`` (:mod:`.fast`), ``standard``
(:mod:`.transforms`) and ``gpu`` (:mod:`.gpu`)."""

from __future__ import annotations

from typing import Any

from .._defaults import DATA_PIPELINES
from .fast import FastImageTransform, undecoded
from .gpu import EncodedImageTransform, encoded_rows
from .loading import ImageDatasetBundle
from .transforms import TransformedDataset, build_transforms, collate_fn

__all__ = ["DATA_PIPELINES", "image_datasets"]


def image_datasets(
    bundle: ImageDatasetBundle,
    image_processor_or_stats: Any,
    pipeline: str = "fast",
    draft: str | None = "image",
    seed: int | None = None,
) -> tuple[TransformedDataset, TransformedDataset, Any]:
    """Training and evaluation datasets of ``{"pixel_values", "labels"}`` rows plus their collate function.

    Args:
        bundle: From :func:`~deltatune.vision.loading.load_image_dataset`.
        image_processor_or_stats: Size and normalisation source (see :func:`build_transforms`).
        pipeline: One of :data:`DATA_PIPELINES`.
        draft: The fast pipeline's JPEG draft mode (see :class:`FastImageTransform`).
        seed: Seed of the training augmentation, drawn per (seed, epoch, index) so that a resumed run sees the
            crops the uninterrupted one did, whatever the number of workers (None: torch's global generator).

    Raises:
        ValueError: for an unknown ``pipeline`` or ``draft``.
    """
    if pipeline not in DATA_PIPELINES or pipeline == "auto":
        raise ValueError(
            f"data pipeline {pipeline!r} is not valid; choose one of "
            f"{', '.join(repr(p) for p in DATA_PIPELINES if p != 'auto')} ('auto' is resolved by the caller)"
        )
    if pipeline == "gpu":
        train_enc = EncodedImageTransform.from_processor(image_processor_or_stats, train=True)
        eval_enc = EncodedImageTransform.from_processor(image_processor_or_stats, train=False)
        train = TransformedDataset(encoded_rows(bundle.train), train_enc, seed=seed)
        evaluation = TransformedDataset(encoded_rows(bundle.eval), eval_enc)
        return train, evaluation, train_enc.collate()
    if pipeline == "standard":
        train = TransformedDataset(
            bundle.train, build_transforms(image_processor_or_stats, train=True), seed=seed
        )
        evaluation = TransformedDataset(bundle.eval, build_transforms(image_processor_or_stats, train=False))
        return train, evaluation, collate_fn
    train_tf = FastImageTransform.from_processor(image_processor_or_stats, train=True, draft=draft)
    eval_tf = FastImageTransform.from_processor(image_processor_or_stats, train=False, draft=draft)
    train = TransformedDataset(undecoded(bundle.train), train_tf, seed=seed)
    evaluation = TransformedDataset(undecoded(bundle.eval), eval_tf)
    return train, evaluation, train_tf.collate()
