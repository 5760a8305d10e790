"""The guide's recipe as one function: data → base model → adapter → ``DeltaTrainer`` → files for people.

``deltatune train`` and ``deltatune compare`` are thin layers over :func:`run_training`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn

from .. import get_method, get_peft_model
from ..model import PeftModel
from .arguments import accelerator_name, cpu_threads
from .base_model import build_base_model, find_head
from .callbacks import rank_summary
from .checkpoint import is_adalora, save_label_maps
from .precision import forward_gflop, resolve_precision
from .report import model_card, rank_heatmap, training_curve
from .trainer import DeltaTrainer

logger = logging.getLogger(__name__)

__all__ = [
    "GUIDE_DATASET",
    "GUIDE_MODEL",
    "GUIDE_TRAINING_DEFAULTS",
    "RUN_RECORD_NAME",
    "PeakMemory",
    "RunResult",
    "RunSpec",
    "adapter_defaults",
    "build_base_model",
    "find_head",
    "logged_final_evaluation",
    "planned_steps",
    "run_training",
]

GUIDE_MODEL = "google/vit-base-patch16-224-in21k"
GUIDE_DATASET = "food101"
RUN_RECORD_NAME = "deltatune_run.json"
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
    "label_names": ["labels"],
    "report_to": "none",
}


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
        data_pipeline: ``"fast"`` (reduced-size JPEG decoding, uint8 until the batch; the default) or
            ``"standard"`` (see :func:`deltatune.vision.image_datasets`).
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
    data_pipeline: str = "fast"

    @property
    def name(self) -> str:
        base = self.method or str(self.baseline)
        return f"{base} (random backbone)" if self.random_backbone else base

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
        }


@dataclass
class RunResult:
    """What :func:`run_training` returns: the trained model, the trainer and the metrics record."""

    model: nn.Module
    trainer: DeltaTrainer
    metrics: dict[str, Any]
    output_dir: str


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on a GPU, else the process's peak resident set size
    (sampled every 20 ms) above its size at entry. ``peak_mb`` holds the result in MiB."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self.kind = "cuda" if torch.cuda.is_available() else "rss"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _rss_mb() -> float:
        try:
            with open("/proc/self/statm", encoding="ascii") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            return 0.0

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated() / 2**20
        else:
            self._start = self._rss_mb()
            self._peak = self._start

            def sample() -> None:
                while not self._stop.wait(0.02):
                    self._peak = max(self._peak, self._rss_mb())

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.kind == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20 - self._start
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_mb = max(self._peak, self._rss_mb()) - self._start


def adapter_defaults(method: str, head: str | None) -> dict[str, Any]:
    """The guide's adapter settings for ``method``: r=16, alpha=16, query/value, dropout 0.1, head saved
    (AdaLoRA: init_r=12 → target_r=8; its tinit/tfinal/deltaT are fitted to the run's length)."""
    common: dict[str, Any] = {"target_modules": ["query", "value"]}
    if head:
        common["modules_to_save"] = [head]
    per_method: dict[str, dict[str, Any]] = {
        "lora": {"r": 16, "lora_alpha": 16, "lora_dropout": 0.1},
        "loha": {"r": 16, "alpha": 16, "module_dropout": 0.1},
        "lokr": {"r": 16, "alpha": 16, "module_dropout": 0.1},
        "adalora": {"init_r": 12, "target_r": 8},
    }
    return {**common, **per_method.get(method, {"r": 16})}


def adalora_schedule(total_steps: int) -> dict[str, int]:
    """Default AdaLoRA schedule for a run of ``total_steps``: warm up 10%, prune, fix the budget for the
    last 30%, reallocating about 50 times."""
    return {
        "tinit": int(0.1 * total_steps),
        "tfinal": int(0.3 * total_steps),
        "deltaT": max(1, total_steps // 50),
    }


def planned_steps(args: transformers.TrainingArguments, num_train: int) -> int:
    """The optimiser steps ``Trainer`` will plan for ``num_train`` examples (its own formula)."""
    if args.max_steps > 0:
        return int(args.max_steps)
    per_process = math.ceil(num_train / max(args.world_size, 1))
    batches = (
        per_process // args.train_batch_size
        if args.dataloader_drop_last
        else math.ceil(per_process / args.train_batch_size)
    )
    ga = args.gradient_accumulation_steps
    per_epoch = max(batches // ga + int(batches % ga > 0), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def _prepare_model(spec: RunSpec, model: nn.Module, head: str | None, total_steps: int) -> nn.Module:
    if spec.baseline is not None:
        if spec.baseline not in ("linear_probe", "full"):
            raise ValueError(f"unknown baseline {spec.baseline!r}; choose 'linear_probe' or 'full'")
        train_all = spec.baseline == "full"
        for name, p in model.named_parameters():
            p.requires_grad_(train_all or (head is not None and name.startswith(f"{head}.")))
        return model
    assert spec.method is not None
    method = get_method(spec.method)
    kwargs = adapter_defaults(method.name, head)
    if method.name == "adalora" and not {"tinit", "tfinal", "deltaT", "total_step"} & set(
        spec.adapter_kwargs
    ):
        kwargs.update(adalora_schedule(total_steps))
    kwargs.update(spec.adapter_kwargs)
    config = method.config_cls(**kwargs)
    if method.name == "adalora":
        config.check_schedule(getattr(config, "total_step", None) or total_steps)  # type: ignore[attr-defined]
    config.base_model_name_or_path = spec.model
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
) -> RunResult:
    """Trains ``spec`` with ``args`` and writes the adapter, labels, metrics, plots and model card.

    Args:
        spec: What to train.
        args: Training arguments (``output_dir`` receives everything).
        command: The command line to quote in the model card.
        write_report: Write metrics.json, the PNGs and README.md (``compare`` turns it off for baselines).
        callbacks: Extra Trainer callbacks.
        num_threads: CPU threads for torch (default: see :func:`deltatune.train.arguments.cpu_threads`).
        precision: ``"auto"`` (bf16/fp16 autocast where it pays, see :mod:`deltatune.train.precision`),
            ``"fp32"``, ``"bf16"`` or ``"fp16"``; an explicit ``args.bf16``/``args.fp16`` wins. ``args`` is
            updated in place.
    """
    from ..vision import image_datasets, load_image_dataset

    with args.main_process_first(desc="loading the dataset"):  # one download/cache build under torchrun
        bundle = load_image_dataset(
            spec.dataset,
            image_column=spec.image_column,
            label_column=spec.label_column,
            validation_split=spec.validation_split,
            seed=args.seed,
            max_train_samples=spec.max_train_samples,
            max_eval_samples=spec.max_eval_samples,
        )
    base, processor = build_base_model(spec.model, bundle.id2label, spec.random_backbone, args.seed)
    train_ds, eval_ds, collate = image_datasets(bundle, processor, spec.data_pipeline)
    on_cpu = bool(getattr(args, "use_cpu", False)) or accelerator_name() is None
    # the forward cost per example decides CPU threads and bf16; counted only when one of them is left to us
    undecided = num_threads is None or (precision == "auto" and not (args.bf16 or args.fp16))
    gflop = forward_gflop(base, collate([eval_ds[0]])) if on_cpu and undecided else None
    resolve_precision(args, precision, gflop)
    if on_cpu:
        args.dataloader_pin_memory = False  # pinning needs an accelerator (torch warns on every loader)
    head = find_head(base, bundle.num_labels)
    if head is None and spec.method is not None and "modules_to_save" not in spec.adapter_kwargs:
        logger.warning("no classification head found to train; pass --modules_to_save with its module name")
    total_steps = planned_steps(args, len(bundle.train))
    model = _prepare_model(spec, base, head, total_steps)
    trainer = DeltaTrainer(
        model,
        args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=processor,
        data_collator=collate,
        callbacks=callbacks,
    )
    output_dir = str(args.output_dir)
    os.makedirs(output_dir, exist_ok=True)
    main_process = trainer.is_world_process_zero()  # under torchrun/accelerate only rank 0 writes files
    if main_process:
        _write_json(os.path.join(output_dir, RUN_RECORD_NAME), {**spec.record(), "seed": args.seed})
    resume = args.resume_from_checkpoint
    with cpu_threads(base, num_threads, on_cpu, gflop):
        with PeakMemory() as memory:
            train_output = trainer.train(resume_from_checkpoint=resume)
        eval_metrics = logged_final_evaluation(trainer) or trainer.evaluate()
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
        "base_model": spec.model,
        "dataset": spec.dataset,
        "num_train": len(bundle.train),
        "num_eval": len(bundle.eval),
        "num_labels": bundle.num_labels,
        "trainable_params": trainable,
        "all_params": total,
        "trainable_percent": 100 * trainable / max(total, 1),
        "precision": trainer.precision,
        "train_time_s": float(train_output.metrics.get("train_runtime", 0.0)),
        "peak_memory_mb": memory.peak_mb,
        "peak_memory_kind": memory.kind,
        "train": dict(train_output.metrics),
        "eval": dict(eval_metrics),
        "accuracy": float(eval_metrics.get("eval_accuracy", float("nan"))),
        "top5_accuracy": eval_metrics.get("eval_top5_accuracy"),
        "history": trainer.state.log_history,
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
    }
    if isinstance(model, PeftModel):
        config = model.peft_config[model.active_adapter]
        saved = json.loads(model._config_to_save(model.active_adapter).to_json_string())
        metrics["adapter_config_json"] = json.dumps(_compact(saved), indent=2, sort_keys=True)
        if is_adalora(model):
            metrics["ranks"] = rank_summary(model.base_model.current_rank_pattern())
            metrics["init_r"] = getattr(config, "init_r", None)
    if write_report and main_process:
        write_run_report(metrics, output_dir)
    return RunResult(model=model, trainer=trainer, metrics=metrics, output_dir=output_dir)


def logged_final_evaluation(trainer: transformers.Trainer) -> dict[str, Any] | None:
    """The evaluation the Trainer already logged for the model it ended with, or None if there is none.

    With ``load_best_model_at_end`` that is the evaluation at the best checkpoint's step; otherwise the one
    at the last step. Reusing it saves a second pass over the evaluation set (the model, data and eval
    mode are the same, so the numbers would be too).
    """
    state, args = trainer.state, trainer.args
    if args.load_best_model_at_end and state.best_model_checkpoint:
        try:
            step = int(str(state.best_model_checkpoint).rstrip("/").rsplit("-", 1)[1])
        except (IndexError, ValueError):
            return None
    else:
        step = state.global_step
    for entry in reversed(state.log_history):
        if entry.get("step") == step and "eval_loss" in entry:
            return {k: v for k, v in entry.items() if k != "step"}
    return None


def write_run_report(metrics: dict[str, Any], output_dir: str) -> None:
    """metrics.json, training_curve.png, README.md and (AdaLoRA) adalora_ranks.png in ``output_dir``."""
    _write_json(os.path.join(output_dir, "metrics.json"), metrics)
    title = f"{metrics['name']} on {os.path.basename(str(metrics['dataset']).rstrip('/'))}"
    training_curve(metrics["history"], os.path.join(output_dir, "training_curve.png"), title=title)
    if metrics.get("ranks"):
        rank_heatmap(
            metrics["ranks"], os.path.join(output_dir, "adalora_ranks.png"), init_r=metrics.get("init_r")
        )
    if metrics["kind"] == "adapter":
        with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as fh:
            fh.write(model_card(metrics))


def _compact(config: dict[str, Any]) -> dict[str, Any]:
    """The config keys worth reading in a model card: set, non-empty, not bookkeeping."""
    skip = {"peft_version", "auto_mapping", "inference_mode", "megatron_core", "qalora_group_size"}
    return {
        k: v
        for k, v in config.items()
        if k not in skip
        and v is not None
        and v is not False
        and not (isinstance(v, dict | list) and not v)
        and not (k == "rank_pattern" and isinstance(v, dict))
    }


def _write_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, default=str)
    os.replace(tmp, path)
