"""The PNGs a run leaves for people: training curve, confusion matrix, rank heatmap, comparison chart.

Made to read at a glance: text on a coloured cell is white on dark cells and black on light ones, every
colour has a legend, step axes have whole-number ticks, and a panel with nothing to draw says why. Plots
use matplotlib's Agg backend (no display needed) and are written atomically.

Names come from the user's data (class folders, datasets, module names), so every text is drawn as plain
text: mathtext (``$...$``) and TeX are off for the figures made here (:func:`_plain_text`), whatever the
process's matplotlib settings, and a name with ``$``, ``\\`` or ``_`` is drawn as written.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from .._files import atomic_path

__all__ = ["compare_chart", "confusion_plot", "rank_grid", "rank_heatmap", "training_curve"]

#: Colours of the comparison chart (colour-blind safe pairs from matplotlib's tab10).
ADAPTER_COLOUR = "#1f77b4"
RANDOM_COLOUR = "#ff7f0e"
BASELINE_COLOUR = "#7f7f7f"
#: Longest class name drawn in full as a tick label (longer ones are cut with "…").
MAX_LABEL_CHARS = 32
#: What a figure made here draws every text with: plain text, never mathtext or TeX.
PLAIN_TEXT: dict[str, Any] = {"text.parse_math": False, "text.usetex": False}

_F = TypeVar("_F", bound=Callable[..., None])


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.titleweight": "bold"})
    return plt


def _plain_text(function: _F) -> _F:
    """Runs a plot function with :data:`PLAIN_TEXT` (texts, tick labels and the saving all read it)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        import matplotlib

        with matplotlib.rc_context(PLAIN_TEXT):  # type: ignore[arg-type]
            function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _save(fig: Any, path: str) -> None:
    """Writes the figure atomically (a kill never leaves a torn PNG) and frees it."""
    plt = _pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format=os.path.splitext(path)[1].lstrip(".") or "png")
    finally:
        plt.close(fig)


def _text_colour(value: float) -> str:
    """White on a dark cell, near-black on a light one (``value`` is the cell's position on a colour scale
    from light (0) to dark (1))."""
    return "white" if value > 0.55 else "#111111"


def _short(name: Any, limit: int = MAX_LABEL_CHARS) -> str:
    """A class name as a tick label: at most ``limit`` characters (cut with "…")."""
    text = str(name)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _empty_note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes, color="#555555")


def _steps_per_epoch(history: Sequence[dict[str, Any]]) -> float | None:
    for entry in reversed(history):
        step, epoch = entry.get("step"), entry.get("epoch")
        if step and epoch:
            return float(step) / float(epoch)
    return None


@_plain_text
def training_curve(
    log_history: Sequence[dict[str, Any]], path: str, title: str = "", logging_steps: int | None = None
) -> None:
    """Training loss per logging step, evaluation loss and accuracy per evaluation, as a PNG (optimiser
    steps below, epochs above).

    Args:
        log_history: ``trainer.state.log_history``.
        path: Where to write the PNG.
        title: Figure title.
        logging_steps: The run's ``logging_steps``, to say why a short run has no training-loss line.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [h for h in log_history if "eval_loss" in h and "step" in h]
    last_step = max((int(h.get("step", 0)) for h in log_history), default=0)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    few = len(train) < 12
    if train:
        ax_loss.plot(
            *zip(*train, strict=True), "o-" if few else "-", label="train loss", color=ADAPTER_COLOUR
        )
    if evals:
        ax_loss.plot(
            [h["step"] for h in evals],
            [h["eval_loss"] for h in evals],
            "s-",
            label="eval loss",
            color=RANDOM_COLOUR,
        )
        for key, style, colour in (
            ("eval_accuracy", "o-", "#2ca02c"),
            ("eval_top5_accuracy", "s--", "#9467bd"),
        ):
            points = [(h["step"], h[key]) for h in evals if key in h]
            if points:
                label = key.removeprefix("eval_").replace("_", " ").replace("top5", "top-5")
                ax_acc.plot(*zip(*points, strict=True), style, label=label, color=colour)
        final = next((h for h in reversed(evals) if "eval_accuracy" in h), None)
        if final is not None:
            ax_acc.annotate(
                f"{final['eval_accuracy']:.4f}",
                (final["step"], final["eval_accuracy"]),
                textcoords="offset points",
                xytext=(0, -16),
                ha="center",
                fontsize=10,
            )
    if not train:
        why = f" (logging_steps={logging_steps}, the run took {last_step} steps)" if logging_steps else ""
        _empty_note(ax_loss, f"no training loss was logged{why}")
    if not evals:
        _empty_note(ax_acc, "no evaluation in this run (eval_strategy no or --do_eval false)")
    spe = _steps_per_epoch(log_history)
    epochs = max((float(h.get("epoch") or 0) for h in log_history), default=0.0)
    spe = spe if epochs >= 2 else None  # an epoch axis only for runs of a few epochs
    for ax, label in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(loc="best", frameon=False)
            ax.set_xlim(left=0)
            if spe:
                top = ax.secondary_xaxis("top", functions=(lambda s, k=spe: s / k, lambda e, k=spe: e * k))
                top.set_xlabel("epoch")
                top.xaxis.set_major_locator(MaxNLocator(integer=True))
    accuracies = [h[k] for h in evals for k in ("eval_accuracy", "eval_top5_accuracy") if k in h]
    floor = max(0.0, math.floor((min(accuracies) - 0.05) * 10) / 10) if accuracies else 0.0
    ax_acc.set_ylim(floor, 1.01)  # zoomed to the data (from a tenth), so a few points of progress show
    if title:
        fig.suptitle(title, fontweight="bold")
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


@_plain_text
def rank_heatmap(ranks: dict[str, int], path: str, rank_max: int | None = None, title: str = "") -> None:
    """A heatmap of the final rank per layer (rows) and module (columns), as a PNG.

    Args:
        ranks: Module name → kept rank (the tuner's ``rank_summary``).
        path: Where to write the PNG.
        rank_max: The largest possible rank (colour-scale maximum), e.g. AdaLoRA's ``init_r``.
        title: Figure title.
    """
    plt = _pyplot()
    rows, cols, grid = rank_grid(ranks)
    top = float(rank_max or np.nanmax(grid) or 1)
    fig, ax = plt.subplots(figsize=(2.2 + 1.3 * len(cols), 1.4 + 0.45 * len(rows)))
    image = ax.imshow(grid, cmap="Greens", vmin=0, vmax=top, aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), [f"layer {r}" if r.isdigit() else r for r in rows])
    for i in range(len(rows)):
        for j in range(len(cols)):
            if not np.isnan(grid[i, j]):
                ax.text(
                    j, i, str(int(grid[i, j])), ha="center", va="center", color=_text_colour(grid[i, j] / top)
                )
    fig.colorbar(image, ax=ax, label=f"rank kept (of {int(top)})")
    ax.set_title(title or "final rank per layer and module")
    fig.tight_layout()
    _save(fig, path)


@_plain_text
def confusion_plot(confusion: np.ndarray, class_names: Sequence[str], path: str, title: str = "") -> None:
    """The confusion matrix as a PNG: rows are true classes, columns predictions; each cell's colour is its
    share of the true class (so a class's accuracy is the darkness of its diagonal cell) and, up to 20
    classes, it is labelled with its count. Class names are hidden above 40 classes."""
    plt = _pyplot()
    confusion = np.asarray(confusion)
    n = len(class_names)
    support = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, np.maximum(support, 1))
    size = min(3.5 + 0.45 * n, 18)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if n <= 40:
        labels = 13 if n <= 10 else 10
        names = [_short(c) for c in class_names]
        rotation = 90 if max(len(c) for c in names) > 3 else 0
        ax.set_xticks(range(n), names, rotation=rotation, fontsize=labels)
        ax.set_yticks(range(n), names, fontsize=labels)
    if n <= 20:
        fontsize = 13 if n <= 10 else 9
        for i in range(n):
            for j in range(n):
                count = int(confusion[i, j])
                if count or i == j:
                    ax.text(
                        j,
                        i,
                        str(count),
                        ha="center",
                        va="center",
                        fontsize=fontsize,
                        color=_text_colour(share[i, j]),
                    )
    ax.set_xlabel("predicted class", fontsize=12)
    ax.set_ylabel("true class", fontsize=12)
    ax.set_title(title or "confusion matrix", fontsize=13)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    _save(fig, path)


@_plain_text
def compare_chart(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
    """Accuracy per run as bars labelled with the accuracy, each run's name with its trainable-parameter
    share below it, as a PNG: adapters on the pretrained backbone, on a random backbone, and the baselines in
    three colours with a legend."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    names = [
        str(r["name"]).replace(" (random backbone)", "\n(random\nbackbone)")
        + f"\n{r['trainable_percent']:.2f}% trained"
        for r in rows
    ]
    accuracy = [float(r["accuracy"]) for r in rows]
    fig, ax = plt.subplots(figsize=(2.5 + 1.45 * len(rows), 5.6))
    colours = [
        BASELINE_COLOUR
        if r.get("kind") != "adapter"
        else RANDOM_COLOUR
        if r.get("random_backbone")
        else ADAPTER_COLOUR
        for r in rows
    ]
    bars = ax.bar(range(len(rows)), accuracy, color=colours, width=0.7)
    for bar in bars:
        x = bar.get_x() + bar.get_width() / 2
        ax.text(
            x,
            bar.get_height() + 0.012,
            f"{bar.get_height():.3f}",
            ha="center",
            va="bottom",
            fontsize=11,
            fontweight="bold",
        )
    ax.set_xticks(range(len(rows)), names, fontsize=9.5)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("eval accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    legend = [
        Patch(color=ADAPTER_COLOUR, label="adapter, pretrained backbone"),
        Patch(color=RANDOM_COLOUR, label="adapter, random backbone"),
        Patch(color=BASELINE_COLOUR, label="baseline (linear probe, full fine-tuning)"),
    ]
    used = set(colours)
    ax.legend(
        handles=[p for p in legend if _hex(p) in used],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.24),
        ncol=3,
        frameon=False,
        fontsize=10,
    )
    ax.set_title(title or "methods and baselines on the same data and seed")
    fig.tight_layout()
    _save(fig, path)


def _hex(patch: Any) -> str:
    from matplotlib.colors import to_hex

    return str(to_hex(patch.get_facecolor()))
