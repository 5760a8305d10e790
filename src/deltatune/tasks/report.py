"""What a run leaves for people: the result files, the plots, ``report.html`` and the adapter's model card
(the cards themselves: :mod:`.cards`).

Every file written here is shareable: the base model is named portably (``deltatune/vit-glyphs-32`` for the
bundled backbone, the hub id for a hub model), a local dataset folder by its name, and the command as the
user typed it, so no path of this machine ends up in them. Nothing here can lose a finished run: a plot or
a page that cannot be written is one warning, after the adapter and the result files are safe.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._files import atomic_write_text, write_json
from ..model_card import model_display_name
from .cards import merged_model_card, model_card, write_merged_model_card
from .html_report import dataset_name, write_html_report
from .plots import compare_chart, confusion_plot, rank_grid, rank_heatmap, training_curve
from .results import EvalPredictions, write_split_results, write_trainer_state

logger = logging.getLogger(__name__)

__all__ = [
    "card_config",
    "compare_chart",
    "confusion_plot",
    "merged_model_card",
    "model_card",
    "rank_grid",
    "rank_heatmap",
    "training_curve",
    "write_merged_model_card",
    "write_outputs",
    "write_results",
    "write_run_report",
]


def write_results(trainer: Any, metrics: dict[str, Any], output_dir: str) -> None:
    """The files transformers' example scripts write: ``train_results.json`` and ``trainer_state.json``
    after training, ``eval_results.json`` after evaluating (with the per-class accuracy and the confusion
    matrix when known), ``all_results.json`` with both, and the run's record ``metrics.json`` (which
    ``merge`` and the cards read). A failure here raises: the run is not finished without them."""
    write_json(os.path.join(output_dir, "metrics.json"), metrics)
    if metrics.get("do_train", True) and metrics.get("train"):
        write_split_results(output_dir, "train", metrics["train"])
        write_trainer_state(trainer.state, output_dir)
    if metrics.get("do_eval", True) and metrics.get("eval"):
        # the images scored, and those skipped as unreadable, as `deltatune evaluate` writes them
        counts = {"eval_samples": metrics["num_eval"], "eval_skipped": metrics.get("eval_skipped", 0)}
        names = ("skipped_images", "per_class_accuracy", "confusion_matrix", "class_names")
        details: dict[str, Any] = {k: metrics[k] for k in names if k in metrics}
        write_split_results(output_dir, "eval", {**metrics["eval"], **counts, **details})


def write_outputs(
    trainer: Any,
    metrics: dict[str, Any],
    output_dir: str,
    write_report: bool = True,
    predictions: EvalPredictions | None = None,
    eval_rows: Any = None,
    data_roots: Sequence[str] = (),
) -> None:
    """The outputs stage of a run, after the adapter is saved: the result files (:func:`write_results`),
    then, when ``write_report``, the files for people (:func:`write_run_report`, which never raises for a
    plot or a page it cannot write)."""
    write_results(trainer, metrics, output_dir)
    if write_report:
        write_run_report(metrics, output_dir, predictions, eval_rows, data_roots)


def write_run_report(
    metrics: dict[str, Any],
    output_dir: str,
    predictions: EvalPredictions | None = None,
    eval_rows: Any = None,
    data_roots: Sequence[str] = (),
) -> list[str]:
    """The model card README.md (for an adapter that trained), training_curve.png,
    confusion_matrix.png, for a method whose ranks were allocated during training (AdaLoRA)
    ``<method>_ranks.png``, and report.html, in ``output_dir``.

    Each file is written on its own: one that fails (a name matplotlib cannot draw, a full disk) is skipped,
    and the run's files already written stay; the failures are said in one warning.

    Args:
        metrics: The run's metrics record (see :func:`~deltatune.tasks.image_classification.run_training`).
        output_dir: Where the files go.
        predictions: The final evaluation's predictions (the misclassified images of ``report.html``).
        eval_rows: The evaluation split (rows ``{"image", "label"}``) in the predictions' order.
        data_roots: Folders the misclassified images are named relative to.

    Returns:
        The names of the files that could not be written, each with its reason (empty when all were).
    """
    failed: list[str] = []

    def attempt(name: str, write: Callable[[str], Any]) -> None:
        try:
            write(os.path.join(output_dir, name))
        except Exception as error:  # a report is never worth a finished run
            logger.debug("could not write %s", name, exc_info=True)
            reason = " ".join(str(error).split())[:160]
            failed.append(f"{name} ({type(error).__name__}{': ' + reason if reason else ''})")

    title = f"{metrics['name']} on {dataset_name(str(metrics['dataset']))}"
    attempt(
        "training_curve.png",
        lambda path: training_curve(
            metrics["history"], path, title=title, logging_steps=metrics.get("logging_steps")
        ),
    )
    if "confusion_matrix" in metrics:
        attempt(
            "confusion_matrix.png",
            lambda path: confusion_plot(
                np.asarray(metrics["confusion_matrix"]),
                metrics["class_names"],
                path,
                title=f"confusion matrix: {title}",
            ),
        )
    if metrics.get("ranks"):
        attempt(
            f"{metrics['method']}_ranks.png",
            lambda path: rank_heatmap(metrics["ranks"], path, rank_max=metrics.get("rank_max")),
        )
    attempt(
        "report.html",
        lambda _: write_html_report(metrics, output_dir, predictions, eval_rows, data_roots=data_roots),
    )
    if metrics["kind"] == "adapter" and metrics.get(
        "do_train", True
    ):  # last: it names report.html if written
        report = not any(f.startswith("report.html ") for f in failed)
        attempt("README.md", lambda path: atomic_write_text(path, model_card(metrics, report=report)))
    if failed:
        logger.warning("could not write %s; the adapter and the result files are saved", ", ".join(failed))
    return failed


def card_config(config: dict[str, Any]) -> dict[str, Any]:
    """The adapter-config keys worth reading in a model card: set, non-empty, not bookkeeping; the base
    model named without a path of this machine (see :func:`deltatune.model_card.model_display_name`)."""
    skip = {"peft_version", "auto_mapping", "inference_mode", "megatron_core", "qalora_group_size"}
    if config.get("base_model_name_or_path"):
        config = {**config, "base_model_name_or_path": model_display_name(config["base_model_name_or_path"])}
    return {
        k: v
        for k, v in config.items()
        if k not in skip
        and v is not None
        and v is not False
        and not (isinstance(v, dict | list) and not v)
        and not (k == "rank_pattern" and isinstance(v, dict))
    }
