"""The recipe's model cards: the README.md of a trained adapter (:func:`model_card`) and of a merged model
(:func:`merged_model_card`, written by ``deltatune merge`` through :func:`write_merged_model_card`).

Both are serialised by :func:`deltatune.model_card.render_card` (``huggingface_hub``'s ``ModelCardData``
for the front matter, parsed back by ``ModelCard``); every string that comes from the user's data (base
model, dataset and folder names, module names, the command) is escaped for markdown, and no path of this
machine is written.
"""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace
from typing import Any

from .._files import atomic_write_text
from ..model_card import (
    card_metadata,
    eval_result_metadata,
    hub_model_id,
    md_code,
    md_fence,
    md_text,
    method_display_name,
    model_display_name,
    render_card,
)
from ..registry import get_method, spec_for
from .html_report import dataset_name

logger = logging.getLogger(__name__)

__all__ = [
    "load_snippet",
    "merged_model_card",
    "model_card",
    "random_backbone_snippet",
    "write_merged_model_card",
]


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _method_name(config: Any) -> str:
    """The registry's name of the method of ``config`` (``"ia3"``: a Hub tag), ``"adapter"`` when unknown."""
    try:
        return spec_for(config).name
    except ValueError:
        return "adapter"


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


def random_backbone_snippet(base_model: str, seed: int, adapter_dir: str = "ADAPTER_DIR") -> list[str]:
    """The "How to load" code of an adapter trained on a randomly initialised backbone: ``base_model``'s
    architecture rebuilt with the run's random weights (seed ``seed``, as the run built it), never its
    pretrained weights."""
    bundled = _bundled(base_model)
    lines = [
        "import json",
        "",
        "import transformers",
        "from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification",
        "",
        "from deltatune import PeftModel  # or: from peft import PeftModel",
    ]
    if bundled:
        lines.append("from deltatune.vision import resolve_model_path")
    lines += [
        "",
        f'adapter = "{adapter_dir}"',
        'with open(f"{adapter}/labels.json", encoding="utf-8") as fh:',
        "    labels = json.load(fh)",
        f"transformers.set_seed({int(seed)})  # the run's seed: the same random backbone",
        "base_config = AutoConfig.from_pretrained(",
        f"    {'resolve_model_path(' + repr(base_model) + ')' if bundled else repr(base_model)},",
        '    id2label={int(k): v for k, v in labels["id2label"].items()},',
        '    label2id=labels["label2id"],',
        ")",
        "base = AutoModelForImageClassification.from_config(base_config)  # random weights, not pretrained",
        "model = PeftModel.from_pretrained(base, adapter)",
        "image_processor = AutoImageProcessor.from_pretrained(adapter)",
    ]
    return lines


def model_card(info: dict[str, Any], report: bool = True) -> str:
    """The README.md written next to a trained adapter.

    Args:
        info: The run's metrics record (``metrics.json``): method, base model, dataset, parameter counts,
            evaluation metrics, adapter config, the command line and, for AdaLoRA, the final ranks.
        report: Whether ``report.html`` was written beside it (the card points to it only then).
    """
    method = str(info["method"])
    display = method_display_name(method)
    base = model_display_name(info["base_model"])
    dataset = dataset_name(str(info["dataset"]))
    eval_metrics = {
        k.removeprefix("eval_"): v for k, v in info.get("eval", {}).items() if k.startswith("eval_")
    }
    # The adapter's own front matter (library_name "peft": the files are PEFT's format, as the library's
    # saved card says), plus what the recipe knows: the task and the method as the registry names it.
    random = info.get("random_backbone") is True
    seed = int(info.get("backbone_seed", 42))
    metadata = card_metadata(  # a random backbone was not fine-tuned from the named model: no base_model
        SimpleNamespace(peft_type=get_method(method).config_cls.PEFT_TYPE),
        None if random else info["base_model"],
    )
    own = ["deltatune", "peft", "image-classification", method]
    metadata["tags"] = own + [tag for tag in metadata["tags"] if tag not in own]
    metadata["pipeline_tag"] = "image-classification"
    # The evaluation as the Hub reads it (model-index): metrics.json's numbers, unrounded.
    model_name = f"{display} adapter for {base}" + (" (random backbone)" if random else "")
    metadata.update(eval_result_metadata(model_name, str(info["dataset"]), dataset, info))
    backbone = f"a random backbone ({md_code(base)}'s architecture, seed {seed})" if random else md_code(base)
    lines = [
        f"# {md_text(display)} adapter for {backbone} on {md_code(dataset)}",
        "",
        f"Trained with `deltatune train` ({md_text(info.get('precision', 'fp32'))}, "
        f"{info.get('train_time_s', 0):.1f} s)."
        + (
            " `report.html` in this folder shows the curves, the confusion matrix and the misclassified images."
            if report
            else ""
        ),
        "",
    ]
    if random:
        lines += [
            f"A baseline: the adapter was trained on {md_code(base)}'s architecture with randomly initialised "
            f"weights (seed {seed}), not on its pretrained weights, so applied to the pretrained model it gives "
            "other predictions; `adapter_config.json` therefore names no `base_model_name_or_path`. The code "
            "below rebuilds the same random backbone (with the same torch and transformers versions), as "
            "`deltatune predict`, `evaluate` and `merge` do.",
            "",
        ]
    lines += [
        "| | |",
        "|---|---|",
        f"| method | {md_text(display)} |",
        f"| base model | {md_code(base, in_table=True)}"
        + (f": architecture only, random weights (seed {seed}) |" if random else " |"),
        f"| dataset | {md_code(dataset, in_table=True)} ({info.get('num_train', '?')} train / "
        f"{info.get('num_eval', '?')} eval images) |",
        f"| classes | {info.get('num_labels', '?')} |",
        f"| trainable params | {info['trainable_params']:,} of {info['all_params']:,} "
        f"({info['trainable_percent']:.4f}%) |",
    ]
    if info.get("optimizer"):  # LoRA+: the B factors' learning rate is loraplus_lr_ratio x the rate
        shown = ", ".join(f"{k} {v:g}" for k, v in info["optimizer"].items())
        lines.append(f"| optimiser | {md_text(shown)} |")
    for key in ("accuracy", "top5_accuracy", "loss"):
        if key in eval_metrics:
            lines.append(f"| eval {key.replace('_', ' ')} | {md_text(_fmt(eval_metrics[key]))} |")
    lines += ["", "## Adapter config", "", *md_fence(info.get("adapter_config_json", "{}"), "json"), ""]
    if info.get("ranks"):
        lines += [
            "## Final ranks (allocated during training)",
            "",
            f"![ranks]({method}_ranks.png)",
            "",
            "| module | rank |",
            "|---|---|",
        ]
        lines += [f"| {md_code(name, in_table=True)} | {rank} |" for name, rank in info["ranks"].items()]
        lines.append("")
    lines += ["## Training curve", "", "![training curve](training_curve.png)", "", "## How to load", ""]
    if _bundled(base) and not random:
        lines += [
            f"The base model {md_code(base)} is the backbone bundled with deltatune (`pip install deltatune`); "
            "`resolve_model_path` finds its installed copy and passes hub ids through unchanged.",
            "",
        ]
    snippet = random_backbone_snippet(base, seed) if random else load_snippet(base)
    lines += ["```python", *snippet, "```", "", "Or from the command line:", "", "```bash"]
    lines += [
        "deltatune predict image.png --adapter ADAPTER_DIR",
        "deltatune merge --adapter ADAPTER_DIR --output merged/   # a plain transformers model",
        "```",
        "",
    ]
    if info.get("command"):
        lines += ["## Command", "", *md_fence(info["command"], "bash"), ""]
    return render_card(metadata, "\n".join(lines))


def merged_model_card(info: dict[str, Any]) -> str:
    """The README.md of a merged model folder (``deltatune merge``): a plain transformers classifier.

    Args:
        info: ``base_model`` (its name or path as recorded; None for a random backbone, named by
            ``base_display``), ``method`` (the display name, ``"LoRA"``),
            ``method_name`` (the registry's name, ``"lora"``, the card's tag),
            ``adapter`` (the adapter folder's name), ``num_labels`` and, when known, ``accuracy`` and
            ``dataset``; ``trained_on`` (the adapter's recorded base) when the adapter was merged into
            another base than the one it was trained on: the card says so, and quotes no accuracy.
    """
    base = info.get("base_display") or model_display_name(info["base_model"])
    method = str(info.get("method") or "adapter")
    method_name = str(info.get("method_name") or "adapter")
    metadata = {
        "library_name": "transformers",
        "base_model": hub_model_id(info["base_model"]),
        "pipeline_tag": "image-classification",
        "tags": ["deltatune", "image-classification", method_name, "merged"],
    }
    lines = [
        f"# {md_code(base)} with a {md_text(method)} adapter merged in",
        "",
        f"The adapter {md_code(info.get('adapter', '?'))} was folded into the base weights by `deltatune "
        "merge`: this is a plain transformers image classifier (no deltatune or peft needed to run it), "
        f"{info.get('num_labels', '?')} classes.",
        "",
    ]
    if info.get("trained_on"):
        trained_on = model_display_name(info["trained_on"])
        lines += [
            f"The adapter was trained on {md_code(trained_on)}, not on this base model: its evaluation "
            f"accuracy was measured on {md_code(trained_on)} and does not apply to this model.",
            "",
        ]
    elif info.get("accuracy") is not None:
        model_name = f"{base} with a {method} adapter merged in"
        dataset = str(info.get("dataset") or "")
        label = dataset_name(dataset) if dataset else "the adapter's evaluation split"
        metadata.update(eval_result_metadata(model_name, dataset, label, {"accuracy": info["accuracy"]}))
        on = f" on {md_code(dataset_name(str(info['dataset'])))}" if info.get("dataset") else ""
        lines += [f"Evaluation accuracy of the adapter{on}: {_fmt(float(info['accuracy']))}.", ""]
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
    return render_card(metadata, "\n".join(lines))


def _run_metrics(path: str) -> dict[str, Any]:
    """The run's ``accuracy`` (a finite number in [0, 1]) and ``dataset`` (a non-empty string) from its
    ``metrics.json``, for the merged card. The file is informational: a corrupt one, or a value of another
    kind, is left out with one warning naming the file (and the key), never an error."""
    from .._files import read_json

    if not os.path.isfile(path):
        return {}
    try:
        metrics = read_json(path, "the run's metrics")
    except (OSError, ValueError) as err:
        logger.warning(
            "ignored %s (%s): the merged card quotes no accuracy", path, " ".join(str(err).split())
        )
        return {}
    if not isinstance(metrics, dict):
        logger.warning("ignored %s (not a JSON object): the merged card quotes no accuracy", path)
        return {}
    found: dict[str, Any] = {}
    accuracy, dataset = metrics.get("accuracy"), metrics.get("dataset")
    if isinstance(accuracy, int | float) and not isinstance(accuracy, bool) and 0 <= accuracy <= 1:
        found["accuracy"] = float(accuracy)  # NaN fails the range test; inf too
    elif accuracy is not None:
        logger.warning(
            "ignored accuracy %.40r in %s (not a number in [0, 1]): the merged card quotes no accuracy",
            accuracy,
            path,
        )
    if isinstance(dataset, str) and dataset.strip():
        found["dataset"] = dataset
    elif dataset is not None:
        logger.warning("ignored dataset %.40r in %s (not a name)", dataset, path)
    seed, model = metrics.get("backbone_seed"), metrics.get("base_model")
    if isinstance(seed, int) and not isinstance(seed, bool) and isinstance(model, str) and model.strip():
        found["random_backbone"] = (
            f"random backbone ({model_display_name(model)}'s architecture, seed {seed})"
        )
    return found


def _same_model(first: str, second: str) -> bool:
    """Whether two base-model names or paths load the same model: equal names, the bundled backbone under
    any of its names, or two spellings of one local folder."""
    from ..vision import resolve_model_path

    first, second = resolve_model_path(first), resolve_model_path(second)
    if first == second:
        return True
    return os.path.isdir(first) and os.path.isdir(second) and os.path.samefile(first, second)


def write_merged_model_card(
    output_dir: str, adapter_dir: str, peft_config: Any, num_labels: int, base_model: str | None = None
) -> None:
    """Writes the merged model's README.md (see :func:`merged_model_card`), naming the base model portably
    and quoting the adapter's accuracy from its ``metrics.json`` when there is one and the adapter was merged
    into the base it was trained on.

    Args:
        output_dir: The merged model's folder.
        adapter_dir: The adapter folder that was merged.
        peft_config: The adapter's configs (``{name: config}``) or one config.
        num_labels: Classes of the classifier.
        base_model: The base model merged into (``merge --model``); None: the one the adapter records.
    """
    from .classifier import portable_model_name

    config = next(iter(peft_config.values())) if isinstance(peft_config, dict) else peft_config
    recorded = str(getattr(config, "base_model_name_or_path", None) or "")
    other = bool(base_model) and not (recorded and _same_model(str(base_model), recorded))
    info: dict[str, Any] = {
        "base_model": portable_model_name(str(base_model) if other else recorded or "?"),
        "trained_on": portable_model_name(recorded or "an unrecorded base model") if other else None,
        "method": method_display_name(config),
        "method_name": _method_name(config),
        "adapter": os.path.basename(os.path.normpath(adapter_dir)),
        "num_labels": num_labels,
    }
    info.update(_run_metrics(os.path.join(adapter_dir, "metrics.json")))
    random_backbone = info.pop("random_backbone", None)
    if random_backbone and not base_model:  # trained on, and merged into, a random init (its run says so)
        info["base_model"], info["base_display"] = None, random_backbone
    if other:
        logger.warning(
            "merged into %s, not the adapter's recorded base %s (base_model_name_or_path in %s): the card "
            "says so and quotes no accuracy",
            base_model,
            recorded or "(none)",
            os.path.join(adapter_dir, "adapter_config.json"),
        )
    atomic_write_text(os.path.join(output_dir, "README.md"), merged_model_card(info))
