"""``report.html``: one self-contained page per run that opens in any browser, from disk, with no server and
no network: the metrics, the training curves, the confusion matrix, the accuracy per class, a grid of the
misclassified validation images with their predicted and true labels, and the rank heatmap of a method
that allocates ranks (AdaLoRA).

Images are embedded as ``data:`` URIs, the style is inline, and there is no script. Every string that comes
from the run (class names, paths, the command) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._files import atomic_write_text
from .results import EvalPredictions

__all__ = [
    "MAX_MISCLASSIFIED",
    "REPORT_NAME",
    "dataset_name",
    "image_label",
    "misclassified",
    "render_html_report",
    "write_html_report",
]

REPORT_NAME = "report.html"
#: Misclassified validation images shown (the most confident mistakes first).
MAX_MISCLASSIFIED = 24
THUMBNAIL_PX = 96

_STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330;overflow-wrap:anywhere}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:32px 0 10px;border-bottom:1px solid #dde1e7;padding-bottom:4px}
.sub{color:#5a6373;margin:0 0 18px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
.card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:10px 12px}
.card .v{font-size:22px;font-weight:650}.card .k{color:#5a6373;font-size:13px}
img.plot{display:block;max-width:100%;height:auto;background:#fff;border:1px solid #dde1e7;border-radius:8px}
img.matrix{max-width:min(100%,720px)}
.scroll{max-width:100%;overflow-x:auto}
table{border-collapse:collapse;background:#fff}td,th{padding:4px 10px;border-bottom:1px solid #eceff3;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{height:12px;background:#2f6db5;border-radius:3px}.barbox{width:220px;max-width:25vw;background:#e8ecf2;border-radius:3px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(118px,1fr));gap:10px}
figure{margin:0;background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:8px;text-align:center;min-width:0}
figure img{width:96px;height:96px;object-fit:contain;image-rendering:pixelated;background:#000}
figcaption{font-size:12.5px;margin-top:4px}.pred{color:#b3261e;font-weight:600}.true{color:#1b7a3a;font-weight:600}
.path{color:#5a6373;font-size:11.5px}
pre{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:10px;overflow-x:auto;font-size:13px;white-space:pre-wrap}
.note{color:#5a6373}
@media (max-width:600px){main{padding:12px}h1{font-size:21px}h2{font-size:17px}td,th{padding:4px 6px}
.card .v{font-size:19px}.grid{grid-template-columns:repeat(auto-fill,minmax(104px,1fr))}}
"""


def dataset_name(dataset: str) -> str:
    """How a card names the dataset: a hub id or ``offline-default`` as is, a local folder by its name."""
    path = os.path.expanduser(dataset)
    if os.path.isabs(path) or dataset.startswith(".") or os.path.isdir(path):
        return os.path.basename(os.path.normpath(path)) + " (a local image folder)"
    return dataset


def _data_uri(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as fh:
        return "data:image/png;base64," + base64.b64encode(fh.read()).decode("ascii")


def _thumbnail(image: Any) -> str:
    """A PIL image as a ``data:`` URI of at most :data:`THUMBNAIL_PX` pixels a side (small images are
    enlarged without smoothing, so pixels stay sharp)."""
    from PIL import Image

    picture = image.convert("RGB")
    scale = THUMBNAIL_PX / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    picture = picture.resize(size, resample)
    buffer = io.BytesIO()
    if max(image.size) > 64:
        picture.save(buffer, format="JPEG", quality=85)
        kind = "jpeg"
    else:
        picture.save(buffer, format="PNG")
        kind = "png"
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def misclassified(
    predictions: EvalPredictions, limit: int = MAX_MISCLASSIFIED
) -> list[tuple[int, int, int, float]]:
    """(index, predicted, true, confidence) of wrongly classified examples, the most confident first."""
    wrong = np.flatnonzero(predictions.predicted != predictions.labels)
    order = wrong[np.argsort(-predictions.confidence[wrong], kind="stable")][:limit]
    return [
        (int(i), int(predictions.predicted[i]), int(predictions.labels[i]), float(predictions.confidence[i]))
        for i in order
    ]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return (
        f"{value:.{digits}f}"
        if isinstance(value, float)
        else f"{value:,}"
        if isinstance(value, int)
        else str(value)
    )


def _cards(metrics: dict[str, Any]) -> str:
    eval_metrics = metrics.get("eval") or {}
    epochs = (metrics.get("train") or {}).get("epoch") or eval_metrics.get("epoch")
    cards = [
        ("accuracy", _fmt(metrics.get("accuracy"))),
        ("top-5 accuracy", _fmt(metrics.get("top5_accuracy"))),
        ("eval loss", _fmt(eval_metrics.get("eval_loss"))),
        ("trainable parameters", f"{metrics['trainable_params']:,} ({metrics['trainable_percent']:.2f}%)"),
        ("train time", f"{metrics.get('train_time_s', 0.0):.1f} s"),
        ("epochs", _fmt(float(epochs), 2) if epochs else "–"),
        ("precision", str(metrics.get("precision", "?"))),
        ("images", f"{metrics.get('num_train', '?')} train / {metrics.get('num_eval', '?')} eval"),
    ]
    body = "".join(
        f'<div class="card"><div class="v">{html.escape(v)}</div><div class="k">{html.escape(k)}</div></div>'
        for k, v in cards
    )
    return f'<div class="cards">{body}</div>'


def _per_class(metrics: dict[str, Any]) -> str:
    per_class = metrics.get("per_class_accuracy") or {}
    confusion = np.asarray(metrics.get("confusion_matrix") or [[]])
    support = confusion.sum(axis=1) if confusion.size else []
    rows = []
    for i, (name, value) in enumerate(per_class.items()):
        width = 0 if value is None else max(0.0, min(1.0, float(value))) * 100
        count = int(support[i]) if i < len(support) else 0
        rows.append(
            f"<tr><td>{html.escape(str(name))}</td><td class='num'>{_fmt(value)}</td>"
            f"<td class='num'>{count}</td><td><div class='barbox'><div class='bar' style='width:{width:.1f}%'>"
            "</div></div></td></tr>"
        )
    head = "<tr><th>class</th><th>accuracy</th><th>images</th><th></th></tr>"
    return f"<div class='scroll'><table>{head}{''.join(rows)}</table></div>"


def _source_path(rows: Any, index: int) -> str | None:
    """The file behind row ``index`` of an evaluation split, when the split reads files (an image folder,
    possibly through subsets); None otherwise."""
    for _ in range(8):  # subsets of subsets, bounded
        files = getattr(rows, "files", None)
        if isinstance(files, Sequence) and 0 <= index < len(files):
            return str(files[index])
        indices, inner = getattr(rows, "indices", None), getattr(rows, "dataset", None)
        if not isinstance(indices, Sequence) or inner is None or not 0 <= index < len(indices):
            return None
        rows, index = inner, int(indices[index])
    return None


def image_label(rows: Any, index: int, data_roots: Sequence[str] = ()) -> str:
    """How the report names evaluation image ``index``: its path relative to the dataset folder it is in
    (``cat/001.jpg``), its file name when it is in none of ``data_roots``, ``#index`` when it has no file."""
    path = _source_path(rows, index)
    if path is None:
        return f"#{index}"
    for root in data_roots:
        relative = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
        if not relative.startswith(os.pardir):
            return relative.replace(os.sep, "/")
    return os.path.basename(path)


def prediction_rows(predictions: EvalPredictions, eval_rows: Any) -> list[int] | None:
    """The evaluation row each prediction belongs to, or None when they cannot be matched.

    Evaluation drops an unreadable image from its batch (it is counted, never replaced), so a split with bad
    files yields fewer predictions than rows. The readable rows are then found again, in order, and their
    labels must be the predictions' labels, else no row is attributed to any prediction.
    """
    count = len(predictions.labels)
    if len(eval_rows) == count:
        return list(range(count))
    kept: list[int] = []
    labels: list[int] = []
    for index in range(len(eval_rows)):
        try:
            row = eval_rows[index]
            row["image"].convert("RGB")
        except Exception:  # unreadable here as it was in the evaluation
            continue
        kept.append(index)
        labels.append(int(row["label"]))
    if labels != [int(label) for label in predictions.labels]:
        return None
    return kept


def _mistakes(
    predictions: EvalPredictions | None,
    eval_rows: Any,
    class_names: Sequence[str],
    data_roots: Sequence[str] = (),
) -> str:
    if predictions is None or eval_rows is None:
        return "<p class='note'>No predictions were kept for this run (no evaluation).</p>"
    items = misclassified(predictions)
    total = int((predictions.predicted != predictions.labels).sum())
    if not items:
        return f"<p class='note'>Every one of the {len(predictions.labels)} validation images is classified correctly.</p>"
    rows = prediction_rows(predictions, eval_rows)
    if rows is None:
        return (
            f"<p class='note'>{total} of {len(predictions.labels)} validation images are misclassified; their "
            "images are not shown (the evaluation split changed since it was scored).</p>"
        )
    figures = []
    for position, predicted, true, confidence in items:
        index = rows[position]
        try:
            uri = _thumbnail(eval_rows[index]["image"])
        except Exception:  # unreadable now although it was scored: shown without its image
            continue
        pred_name = html.escape(str(class_names[predicted]))
        true_name = html.escape(str(class_names[true]))
        where = html.escape(image_label(eval_rows, index, data_roots))
        figures.append(
            f'<figure><img src="{uri}" alt="{where}: predicted {pred_name}, true {true_name}">'
            f'<figcaption>predicted <span class="pred">{pred_name}</span> ({confidence:.0%})<br>'
            f'true <span class="true">{true_name}</span><br><span class="path">{where}</span></figcaption></figure>'
        )
    note = (
        f"{total} of {len(predictions.labels)} validation images are misclassified; "
        f"{'the ' + str(len(figures)) + ' most confident mistakes' if total > len(figures) else 'all of them'} "
        "are shown, with the model's confidence in its wrong answer."
    )
    return f"<p class='note'>{note}</p><div class='grid'>{''.join(figures)}</div>"


def render_html_report(
    metrics: dict[str, Any],
    output_dir: str,
    predictions: EvalPredictions | None = None,
    eval_rows: Any = None,
    data_roots: Sequence[str] = (),
) -> str:
    """The page as a string (images already in ``output_dir`` are embedded; misclassified images are named
    by their path relative to the first of ``data_roots`` that holds them)."""
    title = f"{metrics['name']} on {dataset_name(str(metrics['dataset']))}"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>{html.escape(title)} · deltatune report</title>",
        f"<style>{_STYLE}</style></head><body><main>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='sub'>base model <code>{html.escape(str(metrics['base_model']))}</code> · "
        f"{html.escape(str(metrics.get('num_labels', '?')))} classes · deltatune report</p>",
        _cards(metrics),
        "<h2>Training curves</h2>",
    ]
    curve = _data_uri(os.path.join(output_dir, "training_curve.png"))
    parts.append(
        f'<img class="plot" src="{curve}" alt="training curves">' if curve else "<p class='note'>–</p>"
    )
    if metrics.get("confusion_matrix"):
        matrix = _data_uri(os.path.join(output_dir, "confusion_matrix.png"))
        parts += ["<h2>Confusion matrix</h2>"]
        if matrix:
            parts.append(f'<img class="plot matrix" src="{matrix}" alt="confusion matrix">')
        parts += ["<h2>Accuracy per class</h2>", _per_class(metrics)]
    class_names = metrics.get("class_names") or []
    parts += [
        "<h2>Misclassified validation images</h2>",
        _mistakes(predictions, eval_rows, class_names, data_roots),
    ]
    if metrics.get("ranks"):
        heatmap = _data_uri(os.path.join(output_dir, f"{metrics['method']}_ranks.png"))
        if heatmap:
            parts += [
                "<h2>Final rank per layer and module</h2>",
                f'<img class="plot" src="{heatmap}" alt="rank heatmap">',
            ]
    if metrics.get("adapter_config_json"):
        parts += ["<h2>Adapter config</h2>", f"<pre>{html.escape(str(metrics['adapter_config_json']))}</pre>"]
    if metrics.get("command"):
        parts += ["<h2>Command</h2>", f"<pre>{html.escape(str(metrics['command']))}</pre>"]
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def write_html_report(
    metrics: dict[str, Any],
    output_dir: str,
    predictions: EvalPredictions | None = None,
    eval_rows: Any = None,
    data_roots: Sequence[str] = (),
) -> str:
    """Writes ``report.html`` into ``output_dir`` (after the PNGs it embeds); returns its path."""
    path = os.path.join(output_dir, REPORT_NAME)
    atomic_write_text(path, render_html_report(metrics, output_dir, predictions, eval_rows, data_roots))
    return path
