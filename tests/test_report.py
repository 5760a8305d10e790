"""Plots that read at a glance and ``report.html`` (issue 12, item 8).

The plots are checked on the figures themselves (text colour against its cell, a legend for every colour,
whole-number step ticks, a note where a line is missing). ``report.html`` is checked as text (self-contained,
escaped) and in a real headless Chromium through the DevTools protocol: no console message, no exception,
no failed load, every image decoded. CI installs Chromium and must run the browser test; elsewhere it is
skipped when no Chromium is installed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser import find_chromium, inspect_page
from PIL import Image
from tiny import save_tiny_vit_dir, write_image_folder

import deltatune.tasks.plots as plots
from deltatune.cli import main
from deltatune.tasks.html_report import misclassified, render_html_report
from deltatune.tasks.results import EvalPredictions


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The figures the plot functions make, kept instead of saved."""
    kept: list[Any] = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: kept.append(fig))
    return kept


def _texts(fig: Any) -> list[Any]:
    return [t for ax in fig.axes for t in ax.texts]


# ---- plots ---------------------------------------------------------------------------------------
def test_confusion_counts_contrast_with_their_cells(figures: list[Any]) -> None:
    confusion = np.array([[48, 2, 0], [1, 45, 4], [0, 30, 20]])
    plots.confusion_plot(confusion, ["cat", "dog", "fox"], "unused.png")
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in _texts(figures[0])}
    assert cells[(0, 0)].get_text() == "48" and cells[(0, 0)].get_color() == "white"  # dark diagonal
    assert cells[(2, 1)].get_text() == "30" and cells[(2, 1)].get_color() == "white"  # 60% of the row
    assert cells[(0, 1)].get_color() == "#111111" and cells[(2, 2)].get_color() == "#111111"  # light cells
    assert (0, 2) not in cells  # empty off-diagonal cells stay blank
    colorbar = figures[0].axes[-1]
    assert colorbar.get_ylabel() == "share of the true class"


def test_compare_chart_has_a_legend_and_readable_labels(figures: list[Any]) -> None:
    rows = [
        {
            "name": "lora",
            "kind": "adapter",
            "random_backbone": False,
            "accuracy": 0.977,
            "trainable_percent": 5.77,
        },
        {
            "name": "full",
            "kind": "baseline",
            "random_backbone": False,
            "accuracy": 0.982,
            "trainable_percent": 100,
        },
        {
            "name": "lora (random backbone)",
            "kind": "adapter",
            "random_backbone": True,
            "accuracy": 0.93,
            "trainable_percent": 5.77,
        },
    ]
    plots.compare_chart(rows, "unused.png")
    ax = figures[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [
        "adapter, pretrained backbone",
        "adapter, random backbone",
        "baseline (linear probe, full fine-tuning)",
    ]
    values = [t for t in ax.texts if t.get_text() in ("0.977", "0.982", "0.930")]
    assert len(values) == 3 and min(t.get_fontsize() for t in values) >= 10
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == [
        "lora\n5.77% trained",
        "full\n100.00% trained",
        "lora\n(random\nbackbone)\n5.77% trained",
    ]
    assert min(t.get_fontsize() for t in ax.get_xticklabels()) >= 9
    colours = {bar.get_facecolor()[:3] for bar in ax.patches}
    assert len(colours) == 3


def test_a_two_step_curve_says_why_it_has_no_loss_line(figures: list[Any]) -> None:
    history = [{"eval_loss": 1.9, "eval_accuracy": 0.53, "epoch": 0.06, "step": 2}]
    plots.training_curve(history, "unused.png", logging_steps=5)
    fig = figures[0]
    fig.canvas.draw()
    notes = [t.get_text() for t in _texts(fig)]
    assert "no training loss was logged (logging_steps=5, the run took 2 steps)" in notes
    for ax in fig.axes[:2]:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    plots.training_curve([], "unused.png")
    assert "no evaluation in this run" in " ".join(t.get_text() for t in _texts(figures[1]))


def test_rank_heatmap_numbers_contrast_with_their_cells(figures: list[Any]) -> None:
    plots.rank_heatmap({"layers.0.q": 12, "layers.0.v": 2, "layers.1.q": 7}, "unused.png", rank_max=12)
    colours = {t.get_text(): t.get_color() for t in _texts(figures[0])}
    assert colours == {"12": "white", "2": "#111111", "7": "white"}


# ---- report.html as text -------------------------------------------------------------------------
def _metrics(class_names: list[str]) -> dict[str, Any]:
    return {
        "name": "lora",
        "method": "lora",
        "kind": "adapter",
        "base_model": "deltatune/vit-glyphs-32",
        "dataset": "offline-default",
        "num_labels": len(class_names),
        "num_train": 10,
        "num_eval": 6,
        "class_names": class_names,
        "trainable_params": 100,
        "all_params": 1000,
        "trainable_percent": 10.0,
        "train_time_s": 1.5,
        "precision": "fp32",
        "accuracy": 0.5,
        "top5_accuracy": None,
        "eval": {"eval_loss": 0.7, "eval_accuracy": 0.5, "epoch": 2.0},
        "train": {"epoch": 2.0},
        "confusion_matrix": [[2, 1], [2, 1]],
        "per_class_accuracy": {class_names[0]: 2 / 3, class_names[1]: 1 / 3},
        "history": [],
        "command": "deltatune train --dataset '<script>'",
        "adapter_config_json": '{"r": 16}',
    }


def test_report_is_self_contained_and_escaped(tmp_path: Path) -> None:
    names = ["<b>cat</b>", "dog & co"]
    rows = [{"image": Image.new("L", (8, 8), color=i * 30), "label": i % 2} for i in range(6)]
    predictions = EvalPredictions(
        predicted=np.array([0, 0, 0, 1, 0, 1]),
        labels=np.array([0, 1, 0, 1, 0, 1]),
        confidence=np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.99], dtype=np.float32),
    )
    page = render_html_report(_metrics(names), str(tmp_path), predictions=predictions, eval_rows=rows)
    assert "<b>cat</b>" not in page and "&lt;b&gt;cat&lt;/b&gt;" in page and "dog &amp; co" in page
    assert "<script" not in page and "&lt;script&gt;" in page  # the command is text, not markup
    assert "http://" not in page and "https://" not in page
    sources = [part.split('"', 1)[0] for part in page.split('src="')[1:]]
    assert sources and all(s.startswith("data:image/") for s in sources)
    assert page.count("<figure>") == 1 and "1 of 6 validation images are misclassified" in page
    assert misclassified(predictions) == [(1, 0, 1, pytest.approx(0.8))]


# ---- report.html in a browser --------------------------------------------------------------------
def _chromium() -> None:
    if find_chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser tests: install Debian's chromium (.ci/run does)")
        pytest.skip("no chromium installed (apt-get install chromium); CI installs it and runs this test")


CHECKS = (
    "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)",
    "document.images.length",
    "Array.from(document.querySelectorAll('h2')).map(h => h.textContent)",
    "document.querySelectorAll('figure').length",
    "document.querySelectorAll('figure img').length",
    "document.title",
)


def test_the_browser_check_catches_broken_pages(tmp_path: Path) -> None:
    _chromium()
    page = tmp_path / "broken.html"
    page.write_text(
        '<!doctype html><meta charset="utf-8"><title>t</title><img src="missing.png">'
        "<script>console.error('boom'); notDefined();</script>"
    )
    report = inspect_page(page, CHECKS[:1])
    assert report.values[CHECKS[0]] is False
    joined = "\n".join(report.errors)
    assert "console.error: boom" in joined and "notDefined is not defined" in joined
    assert "ERR_FILE_NOT_FOUND" in joined


@pytest.mark.slow
def test_report_renders_in_chromium_without_errors(tmp_path: Path) -> None:
    _chromium()
    save_tiny_vit_dir(tmp_path / "model")
    write_image_folder(tmp_path / "data", per_class=8, seed=0)
    out = tmp_path / "run"
    argv = [
        "train",
        "--method",
        "adalora",
        "--model",
        str(tmp_path / "model"),
        "--dataset",
        str(tmp_path / "data"),
    ]
    argv += ["--output_dir", str(out), "--num_train_epochs", "2", "--per_device_train_batch_size", "4"]
    assert main([*argv, "--use_cpu", "--logging_steps", "1", "--validation_split", "0.5", "--seed", "1"]) == 0
    shot = tmp_path / "report.png"
    report = inspect_page(out / "report.html", CHECKS, screenshot=shot)
    assert report.errors == []
    values = report.values
    assert values[CHECKS[0]] is True and values[CHECKS[1]] >= 3
    assert values[CHECKS[2]] == [
        "Training curves",
        "Confusion matrix",
        "Accuracy per class",
        "Misclassified validation images",
        "Final rank per layer and module",
        "Adapter config",
        "Command",
    ]
    assert values[CHECKS[3]] == values[CHECKS[4]]  # every mistake has its image
    assert values[CHECKS[5]].startswith("adalora on data (a local image folder)")
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert image.size[0] == 1200 and image.size[1] > 1200 and pixels.std() > 20  # a full page, not blank
