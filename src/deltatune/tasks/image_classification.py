"""Image classification, the guide's recipe in stages: data → base model → machine setup → adapter →
``DeltaTrainer`` → fit → files for people.

:func:`run_training` reads like the recipe; each stage is a function of its own. ``deltatune train`` and
``deltatune compare`` are thin layers over it. The training engine (:mod:`deltatune.train`) knows nothing of
images; this module brings the data (:mod:`deltatune.vision`), the classification head and the report
(:mod:`.report`). What identifies a run (:class:`RunSpec`, :func:`run_record`) lives in :mod:`.run_spec`. A
second task is a new module beside this one.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import transformers
from torch import nn
from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from ..model import PeftModel
from ..registry import get_method
from ..train.arguments import accelerator_name, cpu_threads
from ..train.checkpoint import save_label_maps
from ..train.dataloading import apply_accelerator_defaults, loader_settings_left_alone
from ..train.metrics import compute_classification_metrics, report_from_confusion
from ..train.outputs import write_run_record
from ..train.precision import forward_gflop, resolve_precision
from ..train.run import PeakMemory, fit_batch, logged_final_evaluation, planned_steps
from ..train.trainer import DeltaTrainer
from .classifier import build_base_model, check_new_heads_saved, find_head, new_heads, portable_model_name
from .data_init import attach_configured, sample_batches
from .report import card_config, write_outputs, write_run_report
from .results import EvalPredictions, PredictionRecorder, final_predictions
from .run_spec import (
    GUIDE_DATASET,
    GUIDE_MODEL,
    GUIDE_TARGETS,
    GUIDE_TRAINING_DEFAULTS,
    RunSpec,
    adapter_defaults,
    run_record,
)

logger = logging.getLogger(__name__)

__all__ = [
    "GUIDE_DATASET",
    "GUIDE_MODEL",
    "GUIDE_TARGETS",
    "GUIDE_TRAINING_DEFAULTS",
    "RunResult",
    "RunSpec",
    "adapter_defaults",
    "run_record",
    "run_training",
    "write_run_report",
]


@dataclass
class RunResult:
    """What :func:`run_training` returns: the trained model, the trainer and the metrics record."""

    model: nn.Module
    trainer: DeltaTrainer
    metrics: dict[str, Any]
    output_dir: str


@dataclass
class RunSetup:
    """How a run uses this machine, decided once from the data and the base model.

    Attributes:
        on_cpu: Training on the CPU (no accelerator, or ``use_cpu``).
        gflop: Forward GFLOP per example, when it was needed for a choice (None otherwise).
        pipeline: The resolved data pipeline (``"fast"``, ``"standard"`` or ``"gpu"``).
    """

    on_cpu: bool
    gflop: float | None
    pipeline: str


def run_training(
    spec: RunSpec,
    args: transformers.TrainingArguments,
    *,
    command: str | None = None,
    write_report: bool = True,
    callbacks: list[Any] | None = None,
    num_threads: int | None = None,
    precision: str = "auto",
    dataloader: str = "auto",
    progress: TrainerCallback | None = None,
    do_train: bool = True,
    do_eval: bool = True,
    fit_batch_to_data: bool = False,
    trust_remote_code: bool = False,
    record: dict[str, Any] | None = None,
) -> RunResult:
    """Trains ``spec`` with ``args`` and writes the adapter, labels, metrics, plots and model card: the
    recipe's stages in order (data → base model → machine setup → adapter → trainer → fit → outputs).

    Args:
        spec: What to train.
        args: Training arguments (``output_dir`` receives everything).
        command: The command line as the user typed it, quoted in the model card (None: no command).
        write_report: Write the PNGs, report.html and README.md (``compare`` turns it off for baselines);
            the result files (transformers' scripts' and ``metrics.json``) are written either way.
        callbacks: Extra Trainer callbacks.
        num_threads: CPU threads for torch (default: see :func:`deltatune.train.arguments.cpu_threads`).
        precision: ``"auto"`` (bf16/fp16 autocast where it pays, see :mod:`deltatune.train.precision`),
            ``"fp32"``, ``"bf16"`` or ``"fp16"``; an explicit ``args.bf16``/``args.fp16`` wins. ``args`` is
            updated in place.
        dataloader: ``"auto"``: on an accelerator, when ``args`` keeps transformers' loader defaults, use
            worker processes from the cores this process has (see
            :func:`deltatune.train.dataloading.apply_accelerator_defaults`); ``"keep"``: leave ``args`` alone.
        progress: A callback that reports progress in place of transformers' bar and printed log dicts
            (the CLI's console; a bare ``TrainerCallback()`` for silence).
        do_train: Train (False: only evaluate the model as loaded, as ``--do_train false`` asks).
        do_eval: Evaluate at the end (False: no evaluation; the caller turns ``eval_strategy`` off too).
        fit_batch_to_data: The batch size and accumulation are a recipe's, not the user's: shrink them when
            they would leave fewer than a few optimiser steps per epoch on this data (said in one line).
        trust_remote_code: Let a model or processor folder run the Python code it ships (``auto_map``).
        record: The run record the caller already computed with :func:`run_record` (the CLI checks the
            output folder with it); None computes it here, before anything adapts ``args``.

    The run record is written first, marked ``"running"``, and ``"finished"`` once the adapter and the
    result files are written (a failure in the plots or the report is one warning, see :func:`write_outputs`).
    """
    record = record if record is not None else run_record(spec, args, precision)
    bundle = load_data(spec, args)
    base, processor = build_base_model(
        spec.model,
        bundle.id2label,
        spec.random_backbone,
        args.seed,
        ignore_mismatched_sizes=spec.ignore_mismatched_sizes,
        trust_remote_code=trust_remote_code,
    )
    setup = choose_setup(spec, args, bundle, base, processor, num_threads, precision, dataloader)
    train_ds, eval_ds, collate = _datasets(bundle, processor, setup.pipeline, args.seed)
    if fit_batch_to_data:
        fit_batch(args, len(bundle.train))
    sample = functools.partial(sample_batches, train_ds, collate, args.per_device_train_batch_size)
    model = attach_adapter(spec, base, bundle.num_labels, planned_steps(args, len(bundle.train)), sample)
    trainer, recorder = build_trainer(
        model, args, train_ds, eval_ds, collate, processor, callbacks, progress, spec.optimizer
    )
    output_dir = str(args.output_dir)
    os.makedirs(output_dir, exist_ok=True)
    main_process = trainer.is_world_process_zero()  # under torchrun/accelerate only rank 0 writes files
    if main_process:
        write_run_record(output_dir, record, "running")
    with cpu_threads(base, num_threads, setup.on_cpu, setup.gflop):
        train_metrics, eval_metrics, memory = fit(trainer, do_train, do_eval)
    if do_train:
        save_trained(trainer, model, output_dir)
    metrics = run_metrics(spec, bundle, model, trainer, train_metrics, eval_metrics, memory)
    metrics.update(command=command, do_train=do_train, do_eval=do_eval, logging_steps=args.logging_steps)
    predictions = final_predictions(trainer, recorder) if do_eval else None
    if predictions is not None:  # what was scored, counted as `deltatune evaluate` counts it
        metrics.update(confusion_metrics(predictions, bundle.class_names, eval_ds.skipped, len(bundle.eval)))
    if main_process:
        write_outputs(trainer, metrics, output_dir, write_report, predictions, bundle.eval, _data_roots(spec))
        write_run_record(output_dir, record, "finished")
    return RunResult(model=model, trainer=trainer, metrics=metrics, output_dir=output_dir)


# ---- data ---------------------------------------------------------------------------------------
def load_data(spec: RunSpec, args: transformers.TrainingArguments) -> Any:
    """The run's train and evaluation splits (an :class:`~deltatune.vision.ImageDatasetBundle`), loaded
    once under torchrun (the main process first builds any download or cache)."""
    from ..vision import load_image_dataset

    with args.main_process_first(desc="loading the dataset"):
        return load_image_dataset(
            spec.dataset,
            image_column=spec.image_column,
            label_column=spec.label_column,
            validation_split=spec.validation_split,
            seed=args.seed,
            max_train_samples=spec.max_train_samples,
            max_eval_samples=spec.max_eval_samples,
            validation_dir=spec.validation_dir,
        )


def _datasets(bundle: Any, processor: Any, pipeline: str, seed: int | None) -> tuple[Any, Any, Any]:
    """(train dataset, evaluation dataset, collate) on ``pipeline``: the one place the run's evaluation
    data are built."""
    from ..vision import image_datasets

    return image_datasets(bundle, processor, pipeline, seed=seed)


def _data_roots(spec: RunSpec) -> list[str]:
    """The folders the report names evaluation images relative to (``--validation_dir``, ``--dataset``)."""
    return [root for root in (spec.validation_dir, spec.dataset) if root and os.path.isdir(root)]


# ---- the machine --------------------------------------------------------------------------------
def choose_setup(
    spec: RunSpec,
    args: transformers.TrainingArguments,
    bundle: Any,
    base: nn.Module,
    processor: Any,
    num_threads: int | None,
    precision: str,
    dataloader: str,
) -> RunSetup:
    """Decides how the run uses this machine and updates ``args`` for it: loader workers on an
    accelerator, the precision, the data pipeline, no pinned memory on a CPU. The forward cost per example
    is measured only when a choice depends on it (CPU threads or bf16 on a CPU, the data path on a GPU)."""
    from ..vision import image_datasets
    from ..vision.gpu import choose_pipeline

    on_cpu = bool(getattr(args, "use_cpu", False)) or accelerator_name() is None
    if not on_cpu and dataloader == "auto" and loader_settings_left_alone(args):
        apply_accelerator_defaults(args)
    pipeline = spec.data_pipeline
    probe_ds, _, probe_collate = image_datasets(
        bundle, processor, "fast" if pipeline in ("auto", "gpu") else pipeline
    )
    undecided = num_threads is None or (precision == "auto" and not (args.bf16 or args.fp16))
    needs_cost = (on_cpu and undecided) or (not on_cpu and pipeline == "auto")
    gflop = forward_gflop(base, probe_collate([probe_ds[0]])) if needs_cost else None
    resolve_precision(args, precision, gflop if on_cpu else None)
    if pipeline == "auto" and not on_cpu:
        rate = cpu_images_per_second(probe_ds)
        pipeline, why = choose_pipeline(
            "auto", args.device, bundle.train, rate, args.dataloader_num_workers, gflop
        )
        logger.info("data pipeline: %s", why)
    elif pipeline == "auto":
        pipeline = "fast"
    elif pipeline == "gpu":
        pipeline, _ = choose_pipeline("gpu", args.device, bundle.train, None, 0, None)
    if on_cpu:
        args.dataloader_pin_memory = False  # pinning needs an accelerator (torch warns on every loader)
    return RunSetup(on_cpu=on_cpu, gflop=gflop, pipeline=pipeline)


# ---- the model ----------------------------------------------------------------------------------
def attach_adapter(
    spec: RunSpec, base: nn.Module, num_labels: int, total_steps: int, sample: Any = None
) -> nn.Module:
    """The model that trains: ``base`` with the adapter of ``spec.method`` (the guide's settings under the
    user's, fitted to the run's ``total_steps``; an initialiser computed from data runs on ``sample()``, a few
    training batches), or with the parameters a baseline trains unfrozen."""
    head = find_head(base, num_labels)
    if head is None and spec.method is not None and "modules_to_save" not in spec.adapter_kwargs:
        logger.warning("no classification head found to train; pass --modules_to_save with its module name")
    if spec.baseline is not None:
        if spec.baseline not in ("linear_probe", "full"):
            raise ValueError(f"unknown baseline {spec.baseline!r}; choose 'linear_probe' or 'full'")
        train_all = spec.baseline == "full"
        for name, p in base.named_parameters():
            p.requires_grad_(train_all or (head is not None and name.startswith(f"{head}.")))
        return base
    if spec.method is None:
        raise ValueError("a run needs a method or a baseline")
    method = get_method(spec.method)
    kwargs = {**adapter_defaults(method.name, head, total_steps, spec.adapter_kwargs), **spec.adapter_kwargs}
    config = method.make_config(**kwargs)
    config.check_fits_run(total_steps)
    fresh = new_heads(base)
    model = attach_configured(base, config, sample)  # get_peft_model names the base as loaded, as PEFT does
    check_new_heads_saved(model, fresh, num_labels, spec.model)
    # no path of this machine; none for a random backbone, whose weights are not the named model's
    config.base_model_name_or_path = None if spec.random_backbone else portable_model_name(spec.model)
    return model


# ---- the trainer --------------------------------------------------------------------------------
def build_trainer(
    model: nn.Module,
    args: transformers.TrainingArguments,
    train_ds: Any,
    eval_ds: Any,
    collate: Any,
    processor: Any,
    callbacks: list[Any] | None,
    progress: TrainerCallback | None,
    optimizer: dict[str, Any] | None = None,
) -> tuple[DeltaTrainer, PredictionRecorder]:
    """The :class:`DeltaTrainer`, with a ``compute_metrics`` that keeps each evaluation's predictions for the
    report, ``progress`` (when given) in place of transformers' bar and printed log dicts, and ``optimizer``'s
    options (LoRA+'s ``loraplus_lr_ratio``, ``loraplus_lr_embedding``)."""
    from ..vision.preprocess import SkippedNames  # the evaluation's unreadable images, named with workers too

    recorder = PredictionRecorder(compute_classification_metrics)
    trainer = DeltaTrainer(
        model,
        args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=processor,
        data_collator=collate,
        callbacks=callbacks,
        device_batch_transform=SkippedNames(eval_ds, getattr(collate, "device_transform", None)),
        compute_metrics=recorder,
        **(optimizer or {}),
    )
    recorder.trainer = trainer
    if progress is not None:
        for printer in (ProgressCallback, PrinterCallback):
            trainer.remove_callback(printer)
        trainer.add_callback(progress)
    return trainer, recorder


def fit(
    trainer: DeltaTrainer, do_train: bool, do_eval: bool
) -> tuple[dict[str, Any], dict[str, Any], PeakMemory]:
    """Trains (from ``args.resume_from_checkpoint`` when set) and evaluates the model the run ends with
    (the evaluation the trainer already logged for it, when there is one); returns (train metrics, eval
    metrics, the training's peak memory)."""
    train_metrics: dict[str, Any] = {}
    eval_metrics: dict[str, Any] = {}
    with PeakMemory() as memory:
        trainer.memory_probe = memory.so_far_mb  # recorded in each checkpoint, for a resumed run's report
        if do_train:
            resume = trainer.args.resume_from_checkpoint
            train_metrics = dict(trainer.train(resume_from_checkpoint=resume).metrics)
    if do_eval:
        eval_metrics = dict(logged_final_evaluation(trainer) or trainer.evaluate())
    return train_metrics, eval_metrics, memory


def save_trained(trainer: DeltaTrainer, model: nn.Module, output_dir: str) -> None:
    """The trained weights in ``output_dir``: the adapter (PEFT's files, labels.json), or for a baseline
    the model and its label maps."""
    trainer.save_model(output_dir)
    if not isinstance(model, PeftModel):
        save_label_maps(model, output_dir)


# ---- the record of what happened -----------------------------------------------------------------
def run_metrics(
    spec: RunSpec,
    bundle: Any,
    model: nn.Module,
    trainer: DeltaTrainer,
    train_metrics: dict[str, Any],
    eval_metrics: dict[str, Any],
    memory: PeakMemory,
) -> dict[str, Any]:
    """The run's metrics record (``metrics.json``, the cards, the report, ``compare``'s rows): what ran,
    on what data, what trained, how long, how much memory, and what it scored."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    metrics: dict[str, Any] = {
        "name": spec.name,
        "method": spec.method or spec.baseline,
        "kind": "adapter" if spec.method else "baseline",
        "random_backbone": spec.random_backbone,
        **({"backbone_seed": trainer.args.seed} if spec.random_backbone else {}),  # how to rebuild it
        "base_model": portable_model_name(spec.model),
        "dataset": spec.dataset,
        "num_train": len(bundle.train),
        "num_eval": len(bundle.eval),
        "num_labels": bundle.num_labels,
        "class_names": bundle.class_names,
        "trainable_params": trainable,
        "all_params": total,
        "trainable_percent": 100 * trainable / max(total, 1),
        "precision": trainer.precision,
        "train_time_s": float(train_metrics.get("train_runtime", 0.0)),
        "peak_memory_mb": run_peak_memory(trainer, memory),
        "peak_memory_kind": memory.kind,
        "train": train_metrics,
        "eval": eval_metrics,
        "accuracy": float(eval_metrics.get("eval_accuracy", float("nan"))),
        "top5_accuracy": eval_metrics.get("eval_top5_accuracy"),
        "history": trainer.state.log_history,
        "max_steps": trainer.state.max_steps,
    }
    if spec.optimizer:
        metrics["optimizer"] = dict(spec.optimizer)
    if isinstance(model, PeftModel):
        saved = json.loads(model._config_to_save(model.active_adapter).to_json_string())
        metrics["adapter_config_json"] = json.dumps(card_config(saved), indent=2, sort_keys=True)
        metrics.update(model.base_model.training_summary())  # e.g. AdaLoRA's final ranks
    if not math.isfinite(metrics["accuracy"]):  # written as null (strict JSON), with the reason beside it
        metrics["accuracy_note"] = "no evaluation reported a finite accuracy for the final model"
    return metrics


def run_peak_memory(trainer: DeltaTrainer, memory: PeakMemory) -> float | None:
    """The run's peak memory: this session's, or an earlier session's when it was higher or this one (a resume
    of a finished run) trained nothing; None when no session that trained measured it."""
    earlier = trainer.earlier_peak_memory_mb
    if trainer.session_steps == 0:
        return earlier
    return memory.peak_mb if earlier is None else max(memory.peak_mb, earlier)


def confusion_metrics(
    predictions: EvalPredictions, class_names: list[str], skipped: Sequence[str] = (), rows: int | None = None
) -> dict[str, Any]:
    """The confusion matrix, the accuracy per class (None for a class with no evaluation image) and, as
    ``deltatune evaluate`` reports them, the images scored (``num_eval``) and the unreadable ones skipped
    (``eval_skipped``, named in ``skipped_images``; ``rows``, the split's size, counts them when DataLoader
    workers kept the names)."""
    report = report_from_confusion(predictions.confusion(len(class_names)), None, class_names)
    missed = max(len(skipped), (rows or 0) - report.num_examples)
    return {
        "confusion_matrix": report.confusion.tolist(),
        "per_class_accuracy": {
            name: (value if value == value else None) for name, value in report.per_class_accuracy.items()
        },
        "num_eval": report.num_examples,
        "eval_skipped": missed,
        **({"skipped_images": list(skipped)} if skipped else {}),
    }


def cpu_images_per_second(dataset: Any, samples: int = 16) -> float | None:
    """Images one CPU core prepares per second on the fast path (timed on up to ``samples`` examples of
    ``dataset``, rows through its transform), or None when the dataset is empty."""
    n = min(samples, len(dataset))
    if n == 0:
        return None
    dataset[0]  # warm-up: file cache, lazy imports
    start = time.perf_counter()
    for i in range(n):
        dataset[i % len(dataset)]
    return n / max(time.perf_counter() - start, 1e-9)
