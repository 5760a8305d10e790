"""Image-classification data for deltatune: datasets, label maps, transforms, collate, offline assets.

Example:
    >>> from transformers import AutoImageProcessor
    >>> from deltatune.vision import (
    ...     TransformedDataset, build_transforms, load_image_dataset, offline_default_model_dir
    ... )
    >>> data = load_image_dataset("offline-default")  # or "food101", or a local image folder
    >>> processor = AutoImageProcessor.from_pretrained(offline_default_model_dir())
    >>> train = TransformedDataset(data.train, build_transforms(processor, train=True))
    >>> evaluation = TransformedDataset(data.eval, EvalTransform(evaluation_processor(processor)))
"""

from .fast import FastCollate, FastImageTransform, ImagePathRows, undecoded
from .folder import IMAGE_EXTENSIONS, ImageFolderDataset
from .loading import (
    HubSplit,
    ImageDatasetBundle,
    SubsetDataset,
    detect_columns,
    is_image_folder,
    limit_samples,
    load_image_dataset,
    stratified_split,
)
from .offline import (
    OFFLINE_BACKBONE_DIR,
    OFFLINE_BACKBONE_ID,
    OFFLINE_BACKBONE_NAME,
    OFFLINE_DEFAULT,
    OFFLINE_TRAINING_DEFAULTS,
    DigitsDataset,
    is_bundled_backbone,
    is_offline_default,
    offline_default_model_dir,
    resolve_model_path,
)
from .pipelines import DATA_PIPELINES, image_datasets
from .preprocess import EvalTransform, evaluation_processor, load_rgb
from .standard import StandardImageTransform
from .transforms import (
    ImageTransform,
    TransformedDataset,
    build_transforms,
    collate_fn,
    resolve_size,
    to_rgb,
)

__all__ = [
    "DATA_PIPELINES",
    "IMAGE_EXTENSIONS",
    "OFFLINE_BACKBONE_DIR",
    "OFFLINE_BACKBONE_ID",
    "OFFLINE_BACKBONE_NAME",
    "OFFLINE_DEFAULT",
    "OFFLINE_TRAINING_DEFAULTS",
    "DigitsDataset",
    "EvalTransform",
    "FastCollate",
    "FastImageTransform",
    "HubSplit",
    "ImageDatasetBundle",
    "ImageFolderDataset",
    "ImagePathRows",
    "ImageTransform",
    "StandardImageTransform",
    "SubsetDataset",
    "TransformedDataset",
    "build_transforms",
    "collate_fn",
    "detect_columns",
    "evaluation_processor",
    "image_datasets",
    "is_bundled_backbone",
    "is_image_folder",
    "is_offline_default",
    "limit_samples",
    "load_image_dataset",
    "load_rgb",
    "offline_default_model_dir",
    "resolve_model_path",
    "resolve_size",
    "stratified_split",
    "to_rgb",
    "undecoded",
]
