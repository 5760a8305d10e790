"""The result files transformers' example scripts write, and the evaluation predictions a report needs.

``run_image_classification.py`` (and the other ``examples/pytorch`` scripts) leave in the output folder:
``train_results.json`` (the ``train()`` metrics), ``eval_results.json`` (the final ``evaluate()`` metrics),
``all_results.json`` (both merged) and ``trainer_state.json`` (the Trainer's state: log history, best
checkpoint, steps). :func:`write_split_results` and :func:`write_trainer_state` write the same files, in
strict JSON and atomically, so tools that read them keep working.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._files import read_json, write_json

__all__ = [
    "ALL_RESULTS_NAME",
    "TRAINER_STATE_NAME",
    "EvalPredictions",
    "PredictionRecorder",
    "final_evaluation_step",
    "final_predictions",
    "write_split_results",
    "write_trainer_state",
]

ALL_RESULTS_NAME = "all_results.json"
TRAINER_STATE_NAME = "trainer_state.json"


def write_split_results(output_dir: str, split: str, metrics: dict[str, Any]) -> str:
    """Writes ``<split>_results.json`` and merges ``metrics`` into ``all_results.json``, as transformers'
    ``Trainer.save_metrics(split, metrics)`` does; returns the path of the split's file.

    Args:
        output_dir: The run's output folder.
        split: ``"train"``, ``"eval"`` or ``"test"``.
        metrics: The metrics (``train_*``/``eval_*`` keys, ``epoch``); values must be JSON-able.
    """
    path = os.path.join(output_dir, f"{split}_results.json")
    write_json(path, metrics, sort_keys=True)
    combined_path = os.path.join(output_dir, ALL_RESULTS_NAME)
    combined: dict[str, Any] = {}
    if os.path.isfile(combined_path):
        previous = read_json(combined_path, ALL_RESULTS_NAME)
        combined = previous if isinstance(previous, dict) else {}
    combined.update({k: v for k, v in metrics.items() if not isinstance(v, dict | list)})
    write_json(combined_path, combined, sort_keys=True)
    return path


def write_trainer_state(state: Any, output_dir: str) -> str:
    """Writes the Trainer's state as ``trainer_state.json`` (what ``Trainer.save_state()`` writes); returns
    the path."""
    path = os.path.join(output_dir, TRAINER_STATE_NAME)
    is_instance = dataclasses.is_dataclass(state) and not isinstance(state, type)
    data = dataclasses.asdict(state) if is_instance else dict(vars(state))
    write_json(path, data, sort_keys=True)
    return path


@dataclass
class EvalPredictions:
    """The predictions of one evaluation, in evaluation-set order.

    Attributes:
        predicted: (n,) predicted class ids.
        labels: (n,) true class ids.
        confidence: (n,) softmax probability of the predicted class.
    """

    predicted: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray

    def confusion(self, num_classes: int) -> np.ndarray:
        """(num_classes, num_classes) counts; rows are true classes, columns predictions."""
        matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(matrix, (self.labels, self.predicted), 1)
        return matrix


class PredictionRecorder:
    """A ``compute_metrics`` that wraps another and keeps each evaluation's predictions (three numbers per
    example), keyed by the optimiser step it ran at, so a report can show the confusion matrix and the
    misclassified images of the evaluation the run ends with, without a second pass over the data.

    Args:
        compute_metrics: The wrapped function (its metrics are returned unchanged).
        keep: How many evaluations to keep (the oldest beyond it are dropped, except the best one's step,
            which :meth:`keep_step` protects).
    """

    def __init__(self, compute_metrics: Any, keep: int = 3) -> None:
        self.compute_metrics = compute_metrics
        self.keep = keep
        self.trainer: Any = None
        self.by_step: dict[int, EvalPredictions] = {}
        self.protected: set[int] = set()

    def __call__(self, eval_pred: Any) -> dict[str, float]:
        metrics = self.compute_metrics(eval_pred)
        logits = (
            eval_pred.predictions[0]
            if isinstance(eval_pred.predictions, tuple | list)
            else eval_pred.predictions
        )
        labels = (
            eval_pred.label_ids[0] if isinstance(eval_pred.label_ids, tuple | list) else eval_pred.label_ids
        )
        logits = np.asarray(logits, dtype=np.float32)
        if logits.ndim == 2 and labels is not None:
            shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
            probs = shifted / shifted.sum(axis=-1, keepdims=True)
            step = int(self.trainer.state.global_step) if self.trainer is not None else 0
            self.by_step[step] = EvalPredictions(
                predicted=logits.argmax(axis=-1).astype(np.int64),
                labels=np.asarray(labels).astype(np.int64),
                confidence=probs.max(axis=-1),
            )
            best = final_evaluation_step(self.trainer) if self.trainer is not None else None
            if best is not None:
                self.protected = {best}
            while len(self.by_step) > self.keep:
                oldest = next(
                    (s for s in sorted(self.by_step) if s not in self.protected and s != step), None
                )
                if oldest is None:
                    break
                del self.by_step[oldest]
        return metrics

    def predictions_at(self, step: int | None) -> EvalPredictions | None:
        """The predictions of the evaluation at ``step`` (the latest when None or absent)."""
        if step is not None and step in self.by_step:
            return self.by_step[step]
        return self.by_step[max(self.by_step)] if self.by_step and step is None else None


def final_evaluation_step(trainer: Any) -> int | None:
    """The step whose evaluation describes the model a run ends with: the best checkpoint's with
    ``load_best_model_at_end`` (when it is known), else the last step."""
    state, args = trainer.state, trainer.args
    if getattr(args, "load_best_model_at_end", False) and state.best_model_checkpoint:
        try:
            return int(str(state.best_model_checkpoint).rstrip("/").rsplit("-", 1)[1])
        except (IndexError, ValueError):
            return None
    return int(state.global_step)


def final_predictions(trainer: Any, recorder: PredictionRecorder) -> EvalPredictions | None:
    """The predictions of the evaluation the run ends with: the ones ``recorder`` kept, or, when that evaluation
    ran in an earlier session of a resumed run, one prediction pass of the model as the run ends with it (the
    best checkpoint's with ``load_best_model_at_end``: the same model, so the same predictions). None when
    there is no evaluation set or its outputs are not class scores."""
    found = recorder.predictions_at(final_evaluation_step(trainer))
    if found is not None or trainer.eval_dataset is None:
        return found
    trainer.predict(trainer.eval_dataset)  # goes through the recorder (compute_metrics), at this step
    return recorder.predictions_at(int(trainer.state.global_step))
