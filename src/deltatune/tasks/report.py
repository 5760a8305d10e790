"""What a run leaves for people: training-curve, rank-heatmap, confusion and comparison PNGs, and the model card.

Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._files import atomic_path

__all__ = [
    "compare_chart",
    "confusion_plot",
    "model_card",
    "rank_grid",
    "rank_heatmap",
    "training_curve",
]


def _save(fig: Any, path: str) -> None:
    """Writes the figure atomically (a kill never leaves a torn PNG) and frees it."""
    plt = _pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format=os.path.splitext(path)[1].lstrip(".") or "png")
    finally:
        plt.close(fig)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def training_curve(log_history: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
    """Training loss per logging step and evaluation loss/accuracy per evaluation, as a PNG.

    Args:
        log_history: ``trainer.state.log_history``.
        path: Where to write the PNG.
        title: Figure title.
    """
    plt = _pyplot()
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [h for h in log_history if "eval_loss" in h and "step" in h]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax_loss.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    if evals:
        ax_loss.plot(
            [h["step"] for h in evals],
            [h["eval_loss"] for h in evals],
            "o-",
            label="eval loss",
            color="tab:orange",
        )
        for key, style in (("eval_accuracy", "o-"), ("eval_top5_accuracy", "s--")):
            points = [(h["step"], h[key]) for h in evals if key in h]
            if points:
                ax_acc.plot(
                    *zip(*points, strict=True), style, label=key.removeprefix("eval_").replace("_", " ")
                )
    ax_loss.set_xlabel("optimiser step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_acc.set_xlabel("optimiser step")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1.02)
    if ax_acc.has_data():
        ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def rank_grid(ranks: dict[str, int]) -> tuple[list[str], list[str], np.ndarray]:
    """Arranges ``{"<...>.<layer index>.<...>.<module>": rank}`` as (row labels, column labels, grid).

    Rows are layer indices (the last number in the module path, or the path itself when it has none);
    columns are the module's last name component. Missing cells are NaN.
    """
    cells: dict[tuple[str, str], int] = {}
    for name, rank in ranks.items():
        numbers = re.findall(r"\.(\d+)\.", f".{name}.")
        row = numbers[-1] if numbers else name.rsplit(".", 1)[0]
        col = name.rsplit(".", 1)[-1]
        cells[(row, col)] = rank
    rows = sorted({r for r, _ in cells}, key=lambda r: (not r.isdigit(), int(r) if r.isdigit() else 0, r))
    cols = sorted({c for _, c in cells})
    grid = np.full((len(rows), len(cols)), np.nan)
    for (r, c), rank in cells.items():
        grid[rows.index(r), cols.index(c)] = rank
    return rows, cols, grid


def rank_heatmap(ranks: dict[str, int], path: str, rank_max: int | None = None, title: str = "") -> None:
    """A heatmap of AdaLoRA's final rank per layer (rows) and module (columns), as a PNG.

    Args:
        ranks: Module name → kept rank (the tuner's ``rank_summary``).
        path: Where to write the PNG.
        rank_max: The largest possible rank (colour-scale maximum), e.g. AdaLoRA's ``init_r``.
        title: Figure title.
    """
    plt = _pyplot()
    rows, cols, grid = rank_grid(ranks)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(cols), 1.2 + 0.45 * len(rows)))
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=rank_max or np.nanmax(grid), aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), [f"layer {r}" if r.isdigit() else r for r in rows])
    for i in range(len(rows)):
        for j in range(len(cols)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, str(int(grid[i, j])), ha="center", va="center", color="white", fontsize=9)
    fig.colorbar(image, ax=ax, label="rank")
    ax.set_title(title or "final rank per layer and module")
    fig.tight_layout()
    _save(fig, path)


def confusion_plot(confusion: np.ndarray, class_names: Sequence[str], path: str, title: str = "") -> None:
    """The confusion matrix (rows true, columns predicted) as a PNG; labels are hidden above 30 classes."""
    plt = _pyplot()
    n = len(class_names)
    size = min(4 + 0.35 * n, 16)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(confusion, cmap="Blues")
    if n <= 30:
        ax.set_xticks(range(n), class_names, rotation=90)
        ax.set_yticks(range(n), class_names)
        if n <= 15:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(fig, path)


def compare_chart(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
    """Accuracy per run (bars) with the trainable-parameter share written on each, as a PNG: adapters on the
    pretrained backbone in blue, on a random backbone in orange, baselines in grey."""
    plt = _pyplot()
    names = [str(r["name"]) for r in rows]
    accuracy = [float(r["accuracy"]) for r in rows]
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(rows), 4.5))
    colours = [
        "tab:gray" if r.get("kind") != "adapter" else "tab:orange" if r.get("random_backbone") else "tab:blue"
        for r in rows
    ]
    bars = ax.bar(range(len(rows)), accuracy, color=colours)
    for bar, r in zip(bars, rows, strict=True):
        ax.text(
            bar.get_x() + bar.get_width() / 2,
            bar.get_height() + 0.01,
            f"{bar.get_height():.3f}\n{r['trainable_percent']:.2f}% params",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right")
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("eval accuracy")
    ax.set_title(title or "methods and baselines on the same data and seed")
    fig.tight_layout()
    _save(fig, path)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(info: dict[str, Any]) -> str:
    """The README.md written next to a trained adapter.

    Args:
        info: The run's metrics record (``metrics.json``): method, base model, dataset, parameter counts,
            evaluation metrics, adapter config, the command line and, for AdaLoRA, the final ranks.
    """
    method = str(info["method"])
    eval_metrics = {
        k.removeprefix("eval_"): v for k, v in info.get("eval", {}).items() if k.startswith("eval_")
    }
    lines = [
        "---",
        "library_name: deltatune",
        f"base_model: {info['base_model']}",
        "tags: [deltatune, peft, image-classification, " + method + "]",
        "---",
        "",
        f"# {method.upper()} adapter for `{info['base_model']}` on `{info['dataset']}`",
        "",
        f"Trained with `deltatune train` ({info.get('precision', 'fp32')}, {info.get('train_time_s', 0):.1f} s).",
        "",
        "| | |",
        "|---|---|",
        f"| method | {method} |",
        f"| base model | `{info['base_model']}` |",
        f"| dataset | `{info['dataset']}` ({info.get('num_train', '?')} train / {info.get('num_eval', '?')} eval images) |",
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
    lines += [
        "## Training curve",
        "",
        "![training curve](training_curve.png)",
        "",
        "## How to load",
        "",
        "```python",
        "import json",
        "from transformers import AutoImageProcessor, AutoModelForImageClassification",
        "from deltatune import PeftModel  # or: from peft import PeftModel",
        "",
        'labels = json.load(open("ADAPTER_DIR/labels.json"))',
        'id2label = {int(k): v for k, v in labels["id2label"].items()}',
        "base = AutoModelForImageClassification.from_pretrained(",
        f'    "{info["base_model"]}",',
        "    id2label=id2label,",
        '    label2id=labels["label2id"],',
        "    ignore_mismatched_sizes=True,",
        ")",
        'model = PeftModel.from_pretrained(base, "ADAPTER_DIR")',
        'image_processor = AutoImageProcessor.from_pretrained("ADAPTER_DIR")',
        "```",
        "",
        "Or from the command line:",
        "",
        "```bash",
        "deltatune predict image.png --adapter ADAPTER_DIR",
        "deltatune merge --adapter ADAPTER_DIR --output merged/   # a plain transformers model",
        "```",
        "",
    ]
    if info.get("command"):
        lines += ["## Command", "", "```bash", str(info["command"]), "```", ""]
    return "\n".join(lines)
