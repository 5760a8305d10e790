"""What a run of the image-classification recipe is: the guide's defaults, :class:`RunSpec` and the run record
that identifies a run (``deltatune_run.json``), computed once per run by :func:`run_record`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import transformers

from .._defaults import GUIDE_DATASET, GUIDE_MODEL, GUIDE_TARGETS, GUIDE_TRAINING_DEFAULTS
from ..registry import get_method, spec_for
from ..train.fingerprint import folder_fingerprint, model_fingerprint
from ..train.outputs import training_identity

__all__ = [
    "GUIDE_DATASET",
    "GUIDE_MODEL",
    "GUIDE_TARGETS",
    "GUIDE_TRAINING_DEFAULTS",
    "RunSpec",
    "adapter_defaults",
    "canonical_method",
    "folder_fingerprints",
    "run_record",
    "upgrade_record",
]


@dataclass
class RunSpec:
    """One training run.

    Attributes:
        method: Registered adapter method, or None for a baseline.
        model: Base model id or directory.
        dataset: Dataset id, directory or ``"offline-default"``.
        adapter_kwargs: Config fields given by the user (merged over :func:`adapter_defaults`).
        baseline: ``"linear_probe"`` (only the head trains) or ``"full"`` (everything trains); needs
            ``method=None``.
        random_backbone: Start from randomly initialised weights of the same architecture.
        image_column, label_column, validation_split, max_train_samples, max_eval_samples: Data options
            (see :func:`deltatune.vision.load_image_dataset`).
        data_pipeline: ``"auto"`` (the default: ``"gpu"`` when training on a GPU that the CPU cannot feed,
            else ``"fast"``), ``"gpu"`` (decoding and augmentation on the device, see
            :mod:`deltatune.vision.gpu`), ``"fast"`` (reduced-size JPEG decoding, uint8 until the batch) or
            ``"standard"`` (see :func:`deltatune.vision.image_datasets`).
        validation_dir: An image folder to evaluate on instead of a split of ``dataset`` (a folder).
        ignore_mismatched_sizes: Re-initialise a checkpoint head of another size (False: an error).
        optimizer: LoRA+'s options (``loraplus_lr_ratio``, ``loraplus_lr_embedding``; empty: the Trainer's own
            optimiser), see :func:`deltatune.optimizers.create_loraplus_optimizer`.
        label: What tells this run from another of the same method in a comparison (``init=pissa``).
    """

    method: str | None
    model: str
    dataset: str
    adapter_kwargs: dict[str, Any] = field(default_factory=dict)
    baseline: str | None = None
    random_backbone: bool = False
    image_column: str | None = None
    label_column: str | None = None
    validation_split: float = 0.1
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    data_pipeline: str = "auto"
    validation_dir: str | None = None
    ignore_mismatched_sizes: bool = True
    optimizer: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        if self.method is not None:  # named as what trains: `lora` with use_dora=True is `dora`
            self.method, self.adapter_kwargs = canonical_method(self.method, self.adapter_kwargs)

    @property
    def name(self) -> str:
        base = self.method or str(self.baseline)
        base = f"{base} {self.label}" if self.label else base
        return f"{base} (random backbone)" if self.random_backbone else base

    def identity(self) -> dict[str, Any]:
        """The parts of :meth:`record` that make two runs the same run (a folder holding a run with other
        values is refused)."""
        record = self.record()
        keys = ("method", "baseline", "model", "dataset", "random_backbone", "adapter_kwargs", "optimizer")
        return {k: record[k] for k in keys if k in record}

    def record(self) -> dict[str, Any]:
        """What identifies the run (written to ``deltatune_run.json``)."""
        return {
            "method": self.method,
            "baseline": self.baseline,
            "model": self.model,
            "dataset": self.dataset,
            "random_backbone": self.random_backbone,
            "adapter_kwargs": self.adapter_kwargs,
            "image_column": self.image_column,
            "label_column": self.label_column,
            "validation_split": self.validation_split,
            "max_train_samples": self.max_train_samples,
            "max_eval_samples": self.max_eval_samples,
            "data_pipeline": self.data_pipeline,
            "validation_dir": self.validation_dir,
            **({"optimizer": self.optimizer} if self.optimizer else {}),  # absent: records before it existed
        }


def run_record(
    spec: RunSpec, args: transformers.TrainingArguments, precision: str = "auto"
) -> dict[str, Any]:
    """What identifies a run, as written to ``deltatune_run.json`` and compared before a run writes into a
    folder: the :class:`RunSpec`, the seed, the precision asked for and every training argument that can
    change the result (see :func:`deltatune.train.outputs.training_identity`), and the fingerprints of the local
    folders it trains on (:func:`folder_fingerprints`)."""
    return {
        **spec.record(),
        "seed": args.seed,
        "precision": precision,
        "training": training_identity(args),
        "fingerprint": folder_fingerprints(spec, args.output_dir),
    }


def folder_fingerprints(spec: RunSpec, output_dir: str | None = None) -> dict[str, Any]:
    """``{option: fingerprint}`` of the run's local folders (see :mod:`deltatune.train.fingerprint`): the
    image files of ``--dataset`` and ``--validation_dir`` (every file of a saved or downloaded ``datasets``
    folder; ``output_dir`` left out when it is inside), the model files of ``--model``. Hub names and the
    bundled data and backbone have none; nothing is read but file names and sizes, and samples of the model's
    files."""
    from ..vision import is_bundled_backbone
    from ..vision.folder import IMAGE_EXTENSIONS
    from ..vision.loading import is_image_folder

    found: dict[str, Any] = {}
    exclude = [output_dir] if output_dir else []
    for option in ("dataset", "validation_dir"):
        path = getattr(spec, option)
        if path and os.path.isdir(path):
            suffixes = IMAGE_EXTENSIONS if is_image_folder(path) else None
            found[option] = folder_fingerprint(path, suffixes, exclude)
    if not is_bundled_backbone(spec.model) and os.path.isdir(spec.model):
        found["model"] = model_fingerprint(spec.model)
    return found


def canonical_method(method: str, given: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The registered method that ``given`` makes of ``method`` -- ``lora`` with ``use_dora=True`` trains DoRA,
    so it is ``dora``; ``dora`` with ``use_dora=False`` is ``lora`` -- and ``given`` without the settings that
    name already implies (so ``--method lora --use_dora`` is the same run as ``--method dora``). A method or
    settings the registry cannot resolve are returned unchanged (the run reports the error)."""
    try:
        spec = get_method(method)
        chosen = spec_for(spec.make_config(**given))
    except (ValueError, TypeError):
        return method, given
    missing = object()
    return chosen.name, {k: v for k, v in given.items() if chosen.config_defaults.get(k, missing) != v}


def upgrade_record(previous: dict[str, Any]) -> dict[str, Any]:
    """A run record in today's terms: its method and adapter settings through :func:`canonical_method`, as a
    run names itself now (records written before that named ``--method lora --use_dora`` ``lora``), so that
    folder can still be resumed. Anything else is returned as it was."""
    method, given = previous.get("method"), previous.get("adapter_kwargs")
    if not isinstance(method, str) or not isinstance(given, dict):
        return previous
    method, given = canonical_method(method, given)
    return {**previous, "method": method, "adapter_kwargs": given}


def adapter_defaults(
    method: str, head: str | None, planned: int = 0, given: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The guide's adapter settings for ``method``: query/value, the head saved, and the method's own recipe
    defaults (LoRA: r=16, alpha=16, dropout 0.1; AdaLoRA: init_r=12 → target_r=8 with a schedule fitted to
    the run's ``planned`` steps; see ``AdapterConfig.recipe_defaults``), for what ``given`` leaves unset."""
    spec = get_method(method)
    common: dict[str, Any] = {"target_modules": list(GUIDE_TARGETS)}
    if head:
        common["modules_to_save"] = [head]
    return {**common, **spec.config_cls.recipe_defaults(planned, dict(given or {}))}
