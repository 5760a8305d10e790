"""The names and defaults of the two recipes, and the choices of their options, as plain values.

A leaf that imports nothing (no torch, no transformers): ``deltatune train --help`` shows these values
without loading the libraries that run a training, and the modules that do run it import them from here
(:mod:`deltatune.vision.offline`, :mod:`deltatune.tasks.image_classification`,
:mod:`deltatune.train.precision`, :mod:`deltatune.vision.pipelines`).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BASELINES",
    "DATA_PIPELINES",
    "GUIDE_DATASET",
    "GUIDE_MODEL",
    "GUIDE_TARGETS",
    "GUIDE_TRAINING_DEFAULTS",
    "OFFLINE_ALIASES",
    "OFFLINE_BACKBONE_ID",
    "OFFLINE_BACKBONE_NAME",
    "OFFLINE_DEFAULT",
    "OFFLINE_TRAINING_DEFAULTS",
    "PRECISION_CHOICES",
]

OFFLINE_DEFAULT = "offline-default"
OFFLINE_ALIASES = frozenset({"offline-default", "offline_default", "offline"})
OFFLINE_BACKBONE_NAME = "vit-glyphs-32"
#: The bundled backbone's portable name: written into shareable files (adapter_config.json, model cards) and
#: resolved to the installed copy by :func:`deltatune.vision.resolve_model_path`, so they carry no path of
#: this machine.
OFFLINE_BACKBONE_ID = f"deltatune/{OFFLINE_BACKBONE_NAME}"

# Training arguments that suit the offline default (1000 training images): the guide's Food-101 values
# (batch 128 x accumulation 4, 5 epochs) would give only 10 optimiser steps here. 12 epochs of batch 32 are
# 384 steps, about 25 CPU seconds per method for the bundled backbone (scripts/check_transfer.py).
OFFLINE_TRAINING_DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
    "gradient_accumulation_steps": 1,
    "num_train_epochs": 12,
    "learning_rate": 5e-3,
}

GUIDE_MODEL = "google/vit-base-patch16-224-in21k"
GUIDE_DATASET = "food101"
#: The guide's targets: attention query and value (transformers 4 names; they also find q_proj/v_proj).
GUIDE_TARGETS = ["query", "value"]
#: The guide's TrainingArguments (fp16 is added on a GPU only).
GUIDE_TRAINING_DEFAULTS: dict[str, Any] = {
    "remove_unused_columns": False,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "learning_rate": 5e-3,
    "per_device_train_batch_size": 128,
    "gradient_accumulation_steps": 4,
    "per_device_eval_batch_size": 128,
    "num_train_epochs": 5,
    "logging_steps": 10,
    "load_best_model_at_end": True,
    "save_total_limit": 2,  # with load_best_model_at_end: the best checkpoint and the last one
    "label_names": ["labels"],
    "report_to": "none",
}

#: ``--precision``: see :mod:`deltatune.train.precision`.
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
#: ``--data_pipeline``: ``fast`` (reduced-size JPEG decoding, uint8 until the batch), ``standard``
#: (:class:`~deltatune.vision.standard.StandardImageTransform`: full decoding, float per example), ``gpu``
#: (:mod:`deltatune.vision.gpu`: decoding and augmentation on the training device), ``auto`` (``gpu`` when
#: training on a GPU that the CPU cannot feed, else ``fast``; see :func:`deltatune.vision.gpu.choose_pipeline`).
DATA_PIPELINES = ("auto", "fast", "standard", "gpu")
#: ``deltatune compare --baselines``.
BASELINES = ("linear_probe", "full", "random")
