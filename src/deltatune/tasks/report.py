"""What a run leaves for people: the result files, the plots, ``report.html`` and the model cards (the
adapter's README.md, and the merged model's).

Every file written here is shareable: the base model is named portably (``deltatune/vit-glyphs-32`` for the
bundled backbone, the hub id for a hub model), a local dataset folder by its name, and the command as the
user typed it, so no path of this machine ends up in them.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .._files import atomic_write_text, write_json
from .html_report import dataset_name, write_html_report
from .plots import compare_chart, confusion_plot, rank_grid, rank_heatmap, training_curve
from .results import EvalPredictions, write_split_results, write_trainer_state

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
    "write_results",
    "write_run_report",
]


def write_results(trainer: Any, metrics: dict[str, Any], output_dir: str) -> None:
    """The files transformers' example scripts write: ``train_results.json`` and ``trainer_state.json``
    after training, ``eval_results.json`` after evaluating (with the per-class accuracy and the confusion
    matrix when known) and ``all_results.json`` with both."""
    if metrics.get("do_train", True) and metrics.get("train"):
        write_split_results(output_dir, "train", metrics["train"])
        write_trainer_state(trainer.state, output_dir)
    if metrics.get("do_eval", True) and metrics.get("eval"):
        details: dict[str, Any] = {
            k: metrics[k] for k in ("per_class_accuracy", "confusion_matrix", "class_names") if k in metrics
        }
        write_split_results(
            output_dir, "eval", {**metrics["eval"], "eval_samples": metrics["num_eval"], **details}
        )


def write_run_report(
    metrics: dict[str, Any],
    output_dir: str,
    predictions: EvalPredictions | None = None,
    eval_rows: Any = None,
) -> None:
    """metrics.json, training_curve.png, confusion_matrix.png, report.html, the model card README.md (for an
    adapter that trained) and, for a method whose ranks were allocated during training (AdaLoRA),
    ``<method>_ranks.png``, in ``output_dir``.

    Args:
        metrics: The run's metrics record (see :func:`~deltatune.tasks.image_classification.run_training`).
        output_dir: Where the files go.
        predictions: The final evaluation's predictions (the misclassified images of ``report.html``).
        eval_rows: The evaluation split (rows ``{"image", "label"}``) in the predictions' order.
    """
    write_json(os.path.join(output_dir, "metrics.json"), metrics)
    title = f"{metrics['name']} on {dataset_name(str(metrics['dataset']))}"
    training_curve(
        metrics["history"],
        os.path.join(output_dir, "training_curve.png"),
        title=title,
        logging_steps=metrics.get("logging_steps"),
    )
    if "confusion_matrix" in metrics:
        confusion_plot(
            np.asarray(metrics["confusion_matrix"]),
            metrics["class_names"],
            os.path.join(output_dir, "confusion_matrix.png"),
            title=f"confusion matrix: {title}",
        )
    if metrics.get("ranks"):
        path = os.path.join(output_dir, f"{metrics['method']}_ranks.png")
        rank_heatmap(metrics["ranks"], path, rank_max=metrics.get("rank_max"))
    if metrics["kind"] == "adapter" and metrics.get("do_train", True):
        atomic_write_text(os.path.join(output_dir, "README.md"), model_card(metrics))
    write_html_report(metrics, output_dir, predictions=predictions, eval_rows=eval_rows)


def card_config(config: dict[str, Any]) -> dict[str, Any]:
    """The adapter-config keys worth reading in a model card: set, non-empty, not bookkeeping."""
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


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _bundled(base_model: str) -> bool:
    from ..vision import OFFLINE_BACKBONE_ID

    return base_model == OFFLINE_BACKBONE_ID


def load_snippet(base_model: str, adapter_dir: str = "ADAPTER_DIR") -> list[str]:
    """The "How to load" code of an adapter's card: the PEFT guide's (the base model from
    ``config.base_model_name_or_path``), with the bundled backbone's id resolved to its installed copy."""
    bundled = _bundled(base_model)
    base_arg = (
        "resolve_model_path(config.base_model_name_or_path)" if bundled else "config.base_model_name_or_path"
    )
    lines = [
        "import json",
        "",
        "from transformers import AutoImageProcessor, AutoModelForImageClassification",
        "",
        "from deltatune import PeftConfig, PeftModel  # or: from peft import PeftConfig, PeftModel",
    ]
    if bundled:
        lines.append(
            "from deltatune.vision import resolve_model_path  # the bundled backbone's installed copy"
        )
    lines += [
        "",
        f'adapter = "{adapter_dir}"',
        "config = PeftConfig.from_pretrained(adapter)",
        'with open(f"{adapter}/labels.json", encoding="utf-8") as fh:',
        "    labels = json.load(fh)",
        "base = AutoModelForImageClassification.from_pretrained(",
        f"    {base_arg},",
        '    id2label={int(k): v for k, v in labels["id2label"].items()},',
        '    label2id=labels["label2id"],',
        "    ignore_mismatched_sizes=True,",
        ")",
        "model = PeftModel.from_pretrained(base, adapter)",
        "image_processor = AutoImageProcessor.from_pretrained(adapter)",
    ]
    return lines


def model_card(info: dict[str, Any]) -> str:
    """The README.md written next to a trained adapter.

    Args:
        info: The run's metrics record (``metrics.json``): method, base model, dataset, parameter counts,
            evaluation metrics, adapter config, the command line and, for AdaLoRA, the final ranks.
    """
    method = str(info["method"])
    base = str(info["base_model"])
    dataset = dataset_name(str(info["dataset"]))
    eval_metrics = {
        k.removeprefix("eval_"): v for k, v in info.get("eval", {}).items() if k.startswith("eval_")
    }
    lines = [
        "---",
        "library_name: deltatune",
        f"base_model: {base}",
        "pipeline_tag: image-classification",
        "tags: [deltatune, peft, image-classification, " + method + "]",
        "---",
        "",
        f"# {method.upper()} adapter for `{base}` on `{dataset}`",
        "",
        f"Trained with `deltatune train` ({info.get('precision', 'fp32')}, {info.get('train_time_s', 0):.1f} s). "
        "`report.html` in this folder shows the curves, the confusion matrix and the misclassified images.",
        "",
        "| | |",
        "|---|---|",
        f"| method | {method} |",
        f"| base model | `{base}` |",
        f"| dataset | `{dataset}` ({info.get('num_train', '?')} train / {info.get('num_eval', '?')} eval images) |",
        f"| classes | {info.get('num_labels', '?')} |",
        f"| trainable params | {info['trainable_params']:,} of {info['all_params']:,} "
        f"({info['trainable_percent']:.4f}%) |",
    ]
    for key in ("accuracy", "top5_accuracy", "loss"):
        if key in eval_metrics:
            lines.append(f"| eval {key.replace('_', ' ')} | {_fmt(eval_metrics[key])} |")
    lines += ["", "## Adapter config", "", "```json", info.get("adapter_config_json", "{}"), "```", ""]
    if info.get("ranks"):
        lines += [
            "## Final ranks (allocated during training)",
            "",
            f"![ranks]({info['method']}_ranks.png)",
            "",
            "| module | rank |",
            "|---|---|",
        ]
        lines += [f"| `{name}` | {rank} |" for name, rank in info["ranks"].items()]
        lines.append("")
    lines += ["## Training curve", "", "![training curve](training_curve.png)", "", "## How to load", ""]
    if _bundled(base):
        lines += [
            f"The base model `{base}` is the backbone bundled with deltatune (`pip install deltatune`); "
            "`resolve_model_path` finds its installed copy and passes hub ids through unchanged.",
            "",
        ]
    lines += ["```python", *load_snippet(base), "```", "", "Or from the command line:", "", "```bash"]
    lines += [
        "deltatune predict image.png --adapter ADAPTER_DIR",
        "deltatune merge --adapter ADAPTER_DIR --output merged/   # a plain transformers model",
        "```",
        "",
    ]
    if info.get("command"):
        lines += ["## Command", "", "```bash", str(info["command"]), "```", ""]
    return "\n".join(lines)


def merged_model_card(info: dict[str, Any]) -> str:
    """The README.md of a merged model folder (``deltatune merge``): a plain transformers classifier.

    Args:
        info: ``base_model`` (portable name), ``method``, ``adapter`` (the adapter folder's name),
            ``num_labels`` and, when known, ``accuracy`` and ``dataset``.
    """
    base = str(info["base_model"])
    method = str(info.get("method") or "adapter")
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {base}",
        "pipeline_tag: image-classification",
        f"tags: [deltatune, image-classification, {method}, merged]",
        "---",
        "",
        f"# `{base}` with a {method.upper()} adapter merged in",
        "",
        f"The adapter `{info.get('adapter', '?')}` was folded into the base weights by `deltatune merge`: this is a "
        "plain transformers image classifier (no deltatune or peft needed to run it), "
        f"{info.get('num_labels', '?')} classes.",
        "",
    ]
    if info.get("accuracy") is not None:
        dataset = dataset_name(str(info.get("dataset", "?")))
        lines += [f"Evaluation accuracy of the adapter on `{dataset}`: {_fmt(float(info['accuracy']))}.", ""]
    lines += [
        "## How to use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        'classify = pipeline("image-classification", model="MODEL_DIR")',
        'print(classify("image.png", top_k=3))',
        "```",
        "",
    ]
    return "\n".join(lines)


def write_merged_model_card(output_dir: str, adapter_dir: str, peft_config: Any, num_labels: int) -> None:
    """Writes the merged model's README.md (see :func:`merged_model_card`), naming the base model portably
    and quoting the adapter's accuracy from its ``metrics.json`` when there is one.

    Args:
        output_dir: The merged model's folder.
        adapter_dir: The adapter folder that was merged.
        peft_config: The adapter's configs (``{name: config}``) or one config.
        num_labels: Classes of the classifier.
    """
    from .._files import read_json
    from .classifier import portable_model_name

    config = next(iter(peft_config.values())) if isinstance(peft_config, dict) else peft_config
    info: dict[str, Any] = {
        "base_model": portable_model_name(str(getattr(config, "base_model_name_or_path", None) or "?")),
        "method": str(getattr(config, "peft_type", "adapter")).rsplit(".", 1)[-1].lower(),
        "adapter": os.path.basename(os.path.normpath(adapter_dir)),
        "num_labels": num_labels,
    }
    metrics_path = os.path.join(adapter_dir, "metrics.json")
    if os.path.isfile(metrics_path):
        recorded = read_json(metrics_path, "metrics.json")
        if isinstance(recorded, dict):
            info.update(accuracy=recorded.get("accuracy"), dataset=recorded.get("dataset"))
    atomic_write_text(os.path.join(output_dir, "README.md"), merged_model_card(info))
