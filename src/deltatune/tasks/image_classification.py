"""Image classification, the guide's recipe as one function: data → base model → adapter → ``DeltaTrainer``
→ files for people.

``deltatune train`` and ``deltatune compare`` are thin layers over :func:`run_training`. The training engine
(:mod:`deltatune.train`) knows nothing of images; this module brings the data (:mod:`deltatune.vision`), the
classification head and the report. A second task is a new module beside this one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import transformers
from torch import nn
from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from .._defaults import GUIDE_DATASET, GUIDE_MODEL, GUIDE_TARGETS, GUIDE_TRAINING_DEFAULTS
from ..model import PeftModel, get_peft_model
from ..registry import get_method
from ..train.arguments import accelerator_name, cpu_threads
from ..train.checkpoint import save_label_maps
from ..train.dataloading import apply_accelerator_defaults, loader_settings_left_alone
from ..train.metrics import compute_classification_metrics
from ..train.outputs import training_identity, write_run_record
from ..train.precision import forward_gflop, resolve_precision
from ..train.run import PeakMemory, fit_batch, logged_final_evaluation, planned_steps
from ..train.trainer import DeltaTrainer
from .classifier import build_base_model, find_head, portable_model_name
from .report import card_config, write_results, write_run_report
from .results import PredictionRecorder, final_evaluation_step

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

    @property
    def name(self) -> str:
        base = self.method or str(self.baseline)
        return f"{base} (random backbone)" if self.random_backbone else base

    def identity(self) -> dict[str, Any]:
        """The parts of :meth:`record` that make two runs the same run (a folder holding a run with other
        values is refused)."""
        record = self.record()
        return {
            k: record[k]
            for k in ("method", "baseline", "model", "dataset", "random_backbone", "adapter_kwargs")
        }

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
        }


def run_record(
    spec: RunSpec, args: transformers.TrainingArguments, precision: str = "auto"
) -> dict[str, Any]:
    """What identifies a run, as written to ``deltatune_run.json`` and compared before a run writes into a
    folder: the :class:`RunSpec`, the seed, the precision asked for and every training argument that can
    change the result (see :func:`deltatune.train.outputs.training_identity`)."""
    return {**spec.record(), "seed": args.seed, "precision": precision, "training": training_identity(args)}


@dataclass
class RunResult:
    """What :func:`run_training` returns: the trained model, the trainer and the metrics record."""

    model: nn.Module
    trainer: DeltaTrainer
    metrics: dict[str, Any]
    output_dir: str


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


def _prepare_model(spec: RunSpec, model: nn.Module, head: str | None, total_steps: int) -> nn.Module:
    if spec.baseline is not None:
        if spec.baseline not in ("linear_probe", "full"):
            raise ValueError(f"unknown baseline {spec.baseline!r}; choose 'linear_probe' or 'full'")
        train_all = spec.baseline == "full"
        for name, p in model.named_parameters():
            p.requires_grad_(train_all or (head is not None and name.startswith(f"{head}.")))
        return model
    if spec.method is None:
        raise ValueError("a run needs a method or a baseline")
    method = get_method(spec.method)
    kwargs = {**adapter_defaults(method.name, head, total_steps, spec.adapter_kwargs), **spec.adapter_kwargs}
    config = method.make_config(**kwargs)
    config.check_fits_run(total_steps)
    config.base_model_name_or_path = portable_model_name(spec.model)  # no path of this machine
    return get_peft_model(model, config)


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
) -> RunResult:
    """Trains ``spec`` with ``args`` and writes the adapter, labels, metrics, plots and model card.

    Args:
        spec: What to train.
        args: Training arguments (``output_dir`` receives everything).
        command: The command line as the user typed it, quoted in the model card (None: no command).
        write_report: Write metrics.json, the PNGs, report.html and README.md (``compare`` turns it off
            for baselines); the result files transformers' scripts write are written either way.
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

    The run record (:func:`run_record`) is written first, marked ``"running"``, and ``"finished"`` once
    everything else is written.
    """
    from ..vision import image_datasets, load_image_dataset
    from ..vision.gpu import choose_pipeline

    record = run_record(spec, args, precision)  # before anything below adapts args

    with args.main_process_first(desc="loading the dataset"):  # one download/cache build under torchrun
        bundle = load_image_dataset(
            spec.dataset,
            image_column=spec.image_column,
            label_column=spec.label_column,
            validation_split=spec.validation_split,
            seed=args.seed,
            max_train_samples=spec.max_train_samples,
            max_eval_samples=spec.max_eval_samples,
            validation_dir=spec.validation_dir,
        )
    base, processor = build_base_model(
        spec.model,
        bundle.id2label,
        spec.random_backbone,
        args.seed,
        ignore_mismatched_sizes=spec.ignore_mismatched_sizes,
        trust_remote_code=trust_remote_code,
    )
    on_cpu = bool(getattr(args, "use_cpu", False)) or accelerator_name() is None
    if not on_cpu and dataloader == "auto" and loader_settings_left_alone(args):
        apply_accelerator_defaults(args)
    pipeline = spec.data_pipeline
    probe_ds, _, probe_collate = image_datasets(
        bundle, processor, "fast" if pipeline in ("auto", "gpu") else pipeline
    )
    # the forward cost per example decides CPU threads and bf16 on a CPU, and the data path on a GPU; it is
    # counted only when one of them is left to us
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
    train_ds, eval_ds, collate = image_datasets(bundle, processor, pipeline, seed=args.seed)
    if fit_batch_to_data:
        fit_batch(args, len(bundle.train))
    if on_cpu:
        args.dataloader_pin_memory = False  # pinning needs an accelerator (torch warns on every loader)
    head = find_head(base, bundle.num_labels)
    if head is None and spec.method is not None and "modules_to_save" not in spec.adapter_kwargs:
        logger.warning("no classification head found to train; pass --modules_to_save with its module name")
    total_steps = planned_steps(args, len(bundle.train))
    model = _prepare_model(spec, base, head, total_steps)
    recorder = PredictionRecorder(compute_classification_metrics)  # keeps predictions for the report
    trainer = DeltaTrainer(
        model,
        args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=processor,
        data_collator=collate,
        callbacks=callbacks,
        device_batch_transform=getattr(collate, "device_transform", None),
        compute_metrics=recorder,
    )
    recorder.trainer = trainer
    if progress is not None:  # the caller reports progress: no transformers bar, no printed log dicts
        for printer in (ProgressCallback, PrinterCallback):
            trainer.remove_callback(printer)
        trainer.add_callback(progress)
    output_dir = str(args.output_dir)
    os.makedirs(output_dir, exist_ok=True)
    main_process = trainer.is_world_process_zero()  # under torchrun/accelerate only rank 0 writes files
    if main_process:
        write_run_record(output_dir, record, "running")
    resume = args.resume_from_checkpoint
    train_metrics: dict[str, Any] = {}
    eval_metrics: dict[str, Any] = {}
    with cpu_threads(base, num_threads, on_cpu, gflop):
        with PeakMemory() as memory:
            if do_train:
                train_metrics = dict(trainer.train(resume_from_checkpoint=resume).metrics)
        if do_eval:
            eval_metrics = dict(logged_final_evaluation(trainer) or trainer.evaluate())
    if do_train:
        trainer.save_model(output_dir)
        if not isinstance(model, PeftModel):
            save_label_maps(model, output_dir)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    metrics: dict[str, Any] = {
        "name": spec.name,
        "method": spec.method or spec.baseline,
        "kind": "adapter" if spec.method else "baseline",
        "random_backbone": spec.random_backbone,
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
        "peak_memory_mb": memory.peak_mb,
        "peak_memory_kind": memory.kind,
        "train": train_metrics,
        "eval": eval_metrics,
        "accuracy": float(eval_metrics.get("eval_accuracy", float("nan"))),
        "top5_accuracy": eval_metrics.get("eval_top5_accuracy"),
        "history": trainer.state.log_history,
        "command": command,
        "do_train": do_train,
        "do_eval": do_eval,
        "logging_steps": args.logging_steps,
        "max_steps": trainer.state.max_steps,
    }
    predictions = recorder.predictions_at(final_evaluation_step(trainer)) if do_eval else None
    if predictions is not None:
        confusion = predictions.confusion(bundle.num_labels)
        support = confusion.sum(axis=1)
        metrics["confusion_matrix"] = confusion.tolist()
        metrics["per_class_accuracy"] = {
            name: (float(confusion[i, i] / support[i]) if support[i] else None)
            for i, name in enumerate(bundle.class_names)
        }
    if isinstance(model, PeftModel):
        saved = json.loads(model._config_to_save(model.active_adapter).to_json_string())
        metrics["adapter_config_json"] = json.dumps(card_config(saved), indent=2, sort_keys=True)
        metrics.update(model.base_model.training_summary())  # e.g. AdaLoRA's final ranks
    if not math.isfinite(metrics["accuracy"]):  # written as null (strict JSON), with the reason beside it
        metrics["accuracy_note"] = "no evaluation reported a finite accuracy for the final model"
    if main_process:
        write_results(trainer, metrics, output_dir)
        if write_report:
            write_run_report(metrics, output_dir, predictions=predictions, eval_rows=bundle.eval)
        write_run_record(output_dir, record, "finished")
    return RunResult(model=model, trainer=trainer, metrics=metrics, output_dir=output_dir)


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
