"""Classification metrics for the Trainer's ``compute_metrics`` and for ``deltatune evaluate``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ClassificationReport",
    "classification_report",
    "compute_classification_metrics",
    "report_from_confusion",
    "top_k_accuracy",
]


def _logits_and_labels(eval_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    predictions = getattr(eval_pred, "predictions", None)
    labels = getattr(eval_pred, "label_ids", None)
    if predictions is None:
        predictions, labels = eval_pred
    if isinstance(predictions, tuple | list):
        predictions = predictions[0]
    if isinstance(labels, tuple | list):
        labels = labels[0]
    if labels is None:
        raise ValueError(
            "compute_metrics got no labels: pass label_names=['labels'] in TrainingArguments and a collate "
            "function that returns 'labels'"
        )
    return np.asarray(predictions), np.asarray(labels)


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose label is among the ``k`` highest logits.

    Args:
        logits: (n, num_classes) scores.
        labels: (n,) integer class ids.
        k: How many top classes count as a hit.
    """
    if len(labels) == 0:
        return float("nan")
    k = min(k, logits.shape[-1])
    top = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
    return float((top == labels[:, None]).any(axis=-1).mean())


def compute_classification_metrics(eval_pred: Any) -> dict[str, float]:
    """``compute_metrics`` for ``Trainer``: accuracy, plus top-5 accuracy when there are more than 5 classes.

    Args:
        eval_pred: An ``EvalPrediction`` (or ``(predictions, label_ids)``) with logits (n, num_classes)
            and labels (n,).

    Returns:
        ``{"accuracy": ...}`` and, for more than 5 classes, ``"top5_accuracy"``.
    """
    logits, labels = _logits_and_labels(eval_pred)
    metrics = {"accuracy": float((logits.argmax(axis=-1) == labels).mean()) if len(labels) else float("nan")}
    if logits.shape[-1] > 5:
        metrics["top5_accuracy"] = top_k_accuracy(logits, labels, 5)
    return metrics


@dataclass
class ClassificationReport:
    """Everything ``deltatune evaluate`` reports.

    Attributes:
        accuracy: Top-1 accuracy.
        top5_accuracy: Top-5 accuracy (None with 5 classes or fewer).
        per_class_accuracy: Class name → recall of that class (NaN when the class has no examples).
        confusion: (num_classes, num_classes) counts; rows are true classes, columns predictions.
        class_names: Names in class-id order.
        num_examples: How many examples were scored.
    """

    accuracy: float
    top5_accuracy: float | None
    per_class_accuracy: dict[str, float]
    confusion: np.ndarray
    class_names: list[str]
    num_examples: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (strict JSON: a NaN is written as null, with the reason under ``"notes"``)."""
        data: dict[str, Any] = {
            "accuracy": self.accuracy,
            "top5_accuracy": self.top5_accuracy,
            "per_class_accuracy": self.per_class_accuracy,
            "confusion_matrix": self.confusion.tolist(),
            "class_names": self.class_names,
            "num_examples": self.num_examples,
        }
        empty = [name for name, value in self.per_class_accuracy.items() if value != value]
        notes = ["no examples to evaluate: accuracy is null"] if self.accuracy != self.accuracy else []
        if empty:
            notes.append(f"no evaluation examples of {empty[:10]}: their per-class accuracy is null")
        return {**data, "notes": notes} if notes else data


def classification_report(
    logits: np.ndarray, labels: np.ndarray, class_names: list[str]
) -> ClassificationReport:
    """Accuracy, top-5, per-class accuracy and the confusion matrix.

    Args:
        logits: (n, num_classes) scores.
        labels: (n,) integer class ids.
        class_names: Names of the classes, index = class id.
    """
    num_classes = logits.shape[-1]
    predicted = logits.argmax(axis=-1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    top5_hits = None
    if num_classes > 5 and len(labels):
        top = np.argpartition(-logits, 4, axis=-1)[:, :5]
        top5_hits = int((top == labels[:, None]).any(axis=-1).sum())
    return report_from_confusion(confusion, top5_hits, class_names)


def report_from_confusion(
    confusion: np.ndarray, top5_hits: int | None, class_names: Sequence[str]
) -> ClassificationReport:
    """The :class:`ClassificationReport` of counts: what both the run's final evaluation and ``deltatune
    evaluate`` (which counts batch by batch) report. Every class is listed; one without examples has a NaN
    per-class accuracy (null in JSON, with a note).

    Args:
        confusion: (num_classes, num_classes) counts; rows are true classes, columns predictions.
        top5_hits: Examples whose class is among the 5 highest scores (None with 5 classes or fewer).
        class_names: Names of the classes, index = class id.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    support = confusion.sum(axis=1)
    total = int(support.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)
    top5: float | None = None
    if len(class_names) > 5:
        top5 = (top5_hits or 0) / total if total else float("nan")
    return ClassificationReport(
        accuracy=int(np.trace(confusion)) / total if total else float("nan"),
        top5_accuracy=top5,
        per_class_accuracy={name: float(recall[i]) for i, name in enumerate(class_names)},
        confusion=confusion,
        class_names=list(class_names),
        num_examples=total,
    )
