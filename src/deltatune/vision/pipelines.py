"""The image data paths a run can train with, built from a dataset bundle: ``fast`` (:mod:`.fast`),
``standard`` (:mod:`.standard`) and ``gpu`` (:mod:`.gpu`); evaluation has one path (:mod:`.preprocess`)."""

from __future__ import annotations

from typing import Any

from .._defaults import DATA_PIPELINES
from .fast import FastImageTransform, undecoded
from .gpu import EncodedImageTransform, encoded_rows
from .loading import ImageDatasetBundle
from .preprocess import EvalCollate, EvalTransform, evaluation_processor
from .standard import StandardImageTransform
from .transforms import TransformedDataset

__all__ = ["DATA_PIPELINES", "image_datasets"]


def image_datasets(
    bundle: ImageDatasetBundle,
    image_processor_or_stats: Any,
    pipeline: str = "fast",
    draft: str | None = "image",
    seed: int | None = None,
) -> tuple[TransformedDataset, TransformedDataset, Any]:
    """Training and evaluation datasets of ``{"pixel_values", "labels"}`` rows plus their collate function.

    Only training follows ``pipeline``; evaluation always decodes as transformers' pipeline does and runs
    the evaluation processor (:func:`~deltatune.vision.preprocess.evaluation_processor`), so a run's accuracy
    is what ``deltatune evaluate``, ``predict`` and a merged model give. The collate handles both.

    Args:
        bundle: From :func:`~deltatune.vision.loading.load_image_dataset`.
        image_processor_or_stats: Size and normalisation source (see :func:`~.transforms.build_transforms`).
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
    # evaluation takes one path whatever the training pipeline: full decoding as transformers' pipeline does
    # and the evaluation processor itself (see :mod:`.preprocess`); an unreadable image is counted, not replaced
    processor = evaluation_processor(image_processor_or_stats)
    evaluation = TransformedDataset(undecoded(bundle.eval), EvalTransform(processor), skip_unreadable=True)
    size = (processor.crop_size["height"], processor.crop_size["width"])
    if pipeline == "gpu":
        train_enc = EncodedImageTransform.from_processor(image_processor_or_stats, train=True)
        train = TransformedDataset(encoded_rows(bundle.train), train_enc, seed=seed)
        return train, evaluation, EvalCollate(train_enc.collate(), size)
    if pipeline == "standard":
        standard = StandardImageTransform.from_processor(image_processor_or_stats, train=True)
        train = TransformedDataset(undecoded(bundle.train), standard, seed=seed)
        return train, evaluation, EvalCollate(standard.collate(), size)
    train_tf = FastImageTransform.from_processor(image_processor_or_stats, train=True, draft=draft)
    train = TransformedDataset(undecoded(bundle.train), train_tf, seed=seed)
    return train, evaluation, EvalCollate(train_tf.collate(), size)
