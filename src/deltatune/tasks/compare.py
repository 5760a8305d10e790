"""``deltatune compare``: every method and the baselines on the same data and seed, as a table and a chart."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch
import transformers

from .._files import atomic_write_text, write_json
from ..model_card import md_text
from ..train.lock import RunLock
from ..train.outputs import prepare_output_dir
from .image_classification import RunSpec, run_training
from .plots import compare_chart
from .run_spec import run_record, upgrade_record

logger = logging.getLogger(__name__)

__all__ = ["compare_markdown", "compare_runs", "plan_runs"]

COLUMNS = ("method", "trainable params", "%", "accuracy", "train time (s)", "peak memory (MiB)")


Variant = tuple[str, dict[str, Any], dict[str, Any]]


def plan_runs(
    base: Callable[..., RunSpec],
    methods: Sequence[str],
    baselines: Sequence[str],
    variants: Callable[[str], list[Variant]] | None = None,
) -> list[RunSpec]:
    """The runs of a comparison: each method (once per variant), then linear probe, full fine-tuning and each
    method on a random backbone (as ``baselines`` asks).

    Args:
        base: Builds a :class:`RunSpec` from ``method=...`` and overrides.
        methods: Adapter methods to run.
        baselines: Any of ``"linear_probe"``, ``"full"``, ``"random"``.
        variants: ``method`` → its variants, each (label, adapter kwargs, optimiser options) over the common
            ones (initialisers, LoRA+ ratios); an empty list or None: one run.
    """

    def each(method: str, **overrides: Any) -> list[RunSpec]:
        spec = base(method, **overrides)
        return [
            dataclasses.replace(
                spec,
                label=label,
                adapter_kwargs={**spec.adapter_kwargs, **adapter},
                optimizer={**spec.optimizer, **optimizer},
            )
            for label, adapter, optimizer in (variants(method) if variants else [])
        ] or [spec]

    runs = [run for method in methods for run in each(method)]
    for kind in ("linear_probe", "full"):
        if kind in baselines:
            runs.append(base(None, baseline=kind))
    if "random" in baselines:
        runs += [run for method in methods for run in each(method, random_backbone=True)]
    return _distinct(runs)


def _distinct(runs: list[RunSpec]) -> list[RunSpec]:
    """``runs`` with each run once: a method or value given twice (``lora LoRA``, ``--loraplus_lr_ratio 4
    4.0``, ``lora dora --use_dora``) names the same run and folder, so it runs once (said in one line).

    Raises:
        ValueError: when two different runs would share one folder.
    """
    kept: dict[str, RunSpec] = {}
    for spec in runs:
        folder = _slug(spec.name)
        if folder not in kept:
            kept[folder] = spec
        elif kept[folder].identity() != spec.identity():
            raise ValueError(f"two different runs would both be named {spec.name!r}; give them other values")
        else:
            logger.warning("compare: %s was given twice; it runs once", spec.name)
    return list(kept.values())


def _release_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # return freed heap so the next peak RSS is its own
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _warm_up(
    spec: RunSpec, args: transformers.TrainingArguments, num_threads: int | None, precision: str
) -> None:
    """Two unreported steps first, so one-time allocations (thread pools, autograd buffers, allocator
    arenas) do not count as the first run's peak resident memory."""
    with tempfile.TemporaryDirectory() as tmp:
        warm = dataclasses.replace(
            args,
            output_dir=tmp,
            max_steps=2,
            eval_strategy="no",
            save_strategy="no",
            load_best_model_at_end=False,
            logging_strategy="no",
            resume_from_checkpoint=None,
        )
        silent = transformers.TrainerCallback()  # no bar, no printed result: the warm-up is not a run
        run_training(
            spec, warm, write_report=False, num_threads=num_threads, precision=precision, progress=silent
        )
    _release_memory()


def _slug(name: str) -> str:
    return re.sub(r"[^\w.=-]+", "_", name.replace(" (random backbone)", "-random"))


def compare_runs(
    runs: Sequence[RunSpec],
    args: transformers.TrainingArguments,
    *,
    full_learning_rate: float | None = None,
    num_threads: int | None = None,
    precision: str = "auto",
    reporter: Callable[[int, RunSpec], Any] | None = None,
) -> list[dict[str, Any]]:
    """Trains every run with the same arguments and seed (each in ``output_dir/<name>``).

    Full fine-tuning uses ``full_learning_rate`` (default: the learning rate / 10). Checkpoints are not
    written and the final weights are evaluated. On a CPU, two unreported warm-up steps come first.
    ``precision`` is resolved per run (see :func:`~deltatune.tasks.image_classification.run_training`); every run shares
    the base model, so "auto" picks the same for all. ``reporter(i, spec)`` builds the progress callback of
    the ``i``-th run (the CLI's console; see ``run_training(progress=...)``); None keeps transformers' own.

    Returns:
        One row per run: name, kind, trainable params and %, accuracy, train time, peak memory.
    """
    if runs and not torch.cuda.is_available():
        _warm_up(runs[0], args, num_threads, precision)
    rows: list[dict[str, Any]] = []
    for index, spec in enumerate(runs):
        overrides: dict[str, Any] = {
            "output_dir": os.path.join(str(args.output_dir), _slug(spec.name)),
            "save_strategy": "no",
            "load_best_model_at_end": False,
            "resume_from_checkpoint": None,
        }
        if spec.baseline == "full":
            overrides["learning_rate"] = full_learning_rate or args.learning_rate / 10
        run_args = dataclasses.replace(args, **overrides)
        logger.debug("compare: training %s", spec.name)  # the CLI prints a title per run
        record = run_record(spec, run_args, precision)
        # each run's folder as `train` holds it: another live run in it, or another run's files, are refused
        with RunLock(str(run_args.output_dir)):
            prepare_output_dir(str(run_args.output_dir), record, False, None, upgrade=upgrade_record)
            result = run_training(
                spec,
                run_args,
                write_report=spec.baseline is None,
                num_threads=num_threads,
                precision=precision,
                progress=reporter(index, spec) if reporter is not None else None,
                record=record,
            )
        m = result.metrics
        rows.append(
            {
                "name": spec.name,
                "kind": m["kind"],
                "random_backbone": spec.random_backbone,
                "trainable_params": m["trainable_params"],
                "trainable_percent": m["trainable_percent"],
                "accuracy": m["accuracy"],
                "top5_accuracy": m.get("top5_accuracy"),
                "train_time_s": m["train_time_s"],
                "peak_memory_mb": m["peak_memory_mb"],
                "peak_memory_kind": m["peak_memory_kind"],
            }
        )
        del result
        _release_memory()
    return rows


def compare_markdown(rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """The comparison as a markdown table."""
    lines = [f"### {md_text(title)}", ""] if title else []
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['trainable_params']:,} | {r['trainable_percent']:.2f} | {r['accuracy']:.4f} | "
            f"{r['train_time_s']:.1f} | {r['peak_memory_mb']:.0f} |"
        )
    kind = rows[0]["peak_memory_kind"] if rows else "rss"
    note = (
        "CUDA allocator peak" if kind == "cuda" else "growth of the process's resident memory during training"
    )
    lines += ["", f"Peak memory: {note}."]
    return "\n".join(lines) + "\n"


def write_compare(rows: Sequence[dict[str, Any]], output_dir: str, title: str) -> list[str]:
    """Writes compare.md, compare.json and compare.png into ``output_dir``; returns the paths written (a
    chart that cannot be drawn is one warning: the table and the JSON are what a comparison must keep)."""
    os.makedirs(output_dir, exist_ok=True)
    paths = [os.path.join(output_dir, n) for n in ("compare.md", "compare.json", "compare.png")]
    atomic_write_text(paths[0], compare_markdown(rows, title))
    write_json(paths[1], list(rows))
    try:
        compare_chart(rows, paths[2], title=title)
    except Exception as error:  # a chart is never worth the comparison
        logger.debug("could not write compare.png", exc_info=True)
        logger.warning(
            "could not write compare.png (%s: %s); compare.md and compare.json are saved",
            type(error).__name__,
            " ".join(str(error).split())[:160],
        )
        return paths[:2]
    return paths
