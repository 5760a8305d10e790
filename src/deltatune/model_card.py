"""Model cards (``README.md``): the one place cards are serialised, for the adapter that ``save_pretrained``
writes (as PEFT does), the recipe's run card and the merged model's card.

The YAML front matter is written by ``huggingface_hub``'s :class:`~huggingface_hub.ModelCardData` and every
card is parsed back by :class:`~huggingface_hub.ModelCard` before it is written, so no name can inject a key
or make a card the Hub rejects. Strings from the user's data go into the markdown body through
:func:`md_text`, :func:`md_code` and :func:`md_fence`. No path of this machine is written: a base model is
named by its Hub id when it has one (:func:`hub_model_id`), else by its folder's name
(:func:`model_display_name`).

A new library card gets front matter (``library_name: peft``, since the files are in PEFT's format and load
with it; ``base_model`` for a Hub model; tags) and a short template to fill in. An existing card keeps its
text; only the front matter is completed (keys already there are left alone).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ._files import atomic_write_text
from .registry import get_method, spec_for

logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_CARD_NAME",
    "card_metadata",
    "eval_result_metadata",
    "hub_model_id",
    "md_code",
    "md_fence",
    "md_text",
    "method_display_name",
    "model_display_name",
    "render_card",
    "update_model_card",
]

MODEL_CARD_NAME = "README.md"

_TEMPLATE = """
# Model card: {title}

This repository holds a parameter-efficient adapter in the PEFT format (`adapter_config.json` and
`adapter_model.safetensors`). It was saved with deltatune and loads with either library:

```python
from peft import PeftModel            # or: from deltatune import PeftModel
model = PeftModel.from_pretrained(base_model, "path/or/hub-id")
```

## Adapter

- Method: {method}
- Base model: {base_model}
- Adapted modules: {targets}
- Rank: {rank}

## Intended use and limits

Describe what the adapter was trained for, on which data, and where it should not be used. An adapter
inherits the behaviour and the biases of its base model; evaluate it on your own data before relying on it.

## Training

Describe the data, the preprocessing, the hyper-parameters and the hardware used, so that others can
reproduce the run.

## Evaluation

Report the metrics measured, on which split, and how they compare with the base model.

## Framework versions

- deltatune {version}
"""

#: A folder of the Hugging Face cache: ``.../models--org--name/snapshots/<revision>``.
_HUB_CACHE_SNAPSHOT = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")
#: Characters that mean something in markdown (or in the HTML it may carry) inside a line of text.
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+!|~&])")
#: Plain scalars that YAML 1.2's core schema (the Hub's JavaScript parsers) reads as a null, a boolean or a
#: number, while YAML 1.1 (PyYAML) may read them as strings (``1e3``, ``0o17``): such strings are quoted.
_YAML12_NOT_STR = re.compile(
    r"(?:null|Null|NULL|~|true|True|TRUE|false|False|FALSE"
    r"|[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+"
    r"|[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))"
)


# ---- strings in the markdown body ---------------------------------------------------------------
def _one_line(value: Any) -> str:
    return " ".join(str(value).splitlines()) if value is not None else ""


def md_text(value: Any) -> str:
    """``value`` as literal markdown text on one line: line breaks become spaces, and markdown or HTML
    syntax is backslash-escaped (so ``<b>x</b>`` shows as written, and ``|`` keeps a table cell whole)."""
    return _MD_SPECIAL.sub(r"\\\1", _one_line(value))


def md_code(value: Any, in_table: bool = False) -> str:
    """``value`` as an inline code span on one line, fenced by more backticks than it contains; in a table
    cell, ``|`` is escaped as GitHub-flavoured markdown needs even inside code."""
    text = _one_line(value)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    span = f"{fence}{pad}{text}{pad}{fence}"
    return span.replace("|", "\\|") if in_table else span


def md_fence(value: Any, language: str = "") -> list[str]:
    """``value`` as the lines of a fenced code block whose fence is longer than any backtick run in it."""
    text = str(value)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}{language}", *text.splitlines(), fence]


# ---- names --------------------------------------------------------------------------------------
def _is_local_path(name: str) -> bool:
    expanded = os.path.expanduser(name)
    return os.path.isabs(expanded) or name.startswith((".", "~")) or os.path.exists(expanded)


def hub_model_id(name_or_path: Any) -> str | None:
    """The Hub id of a base model, for the ``base_model`` key: a valid repo id that is not a local path as
    given, or the id of a folder of the Hugging Face cache; None for anything else (a local folder, a name
    with spaces, colons or line breaks)."""
    if not name_or_path:
        return None
    name = str(name_or_path)
    match = _HUB_CACHE_SNAPSHOT.search(name.replace("\\", "/"))
    if match:
        name = f"{match.group(1)}/{match.group(2)}"
    elif _is_local_path(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def model_display_name(name_or_path: Any) -> str:
    """How a card's text names a base model: its Hub id (see :func:`hub_model_id`), else the last part of its
    path (no path of this machine), else ``"(not recorded)"``."""
    hub_id = hub_model_id(name_or_path)
    if hub_id:
        return hub_id
    if not name_or_path:
        return "(not recorded)"
    return os.path.basename(os.path.normpath(os.path.expanduser(str(name_or_path)))) or str(name_or_path)


def method_display_name(config: Any) -> str:
    """How people write the method of an adapter ``config`` or of a registered method name (``"lora"``):
    ``"LoRA"``, ``"DoRA"``, from the registry. A name the registry does not know (a baseline's, ``"full"``)
    is returned as it is."""
    if isinstance(config, str):
        try:
            return str(get_method(config).display_name)
        except ValueError:
            return config
    try:
        return str(spec_for(config).display_name)
    except ValueError:
        return str(getattr(config, "peft_type", "adapter")).rsplit(".", 1)[-1]


# ---- serialising --------------------------------------------------------------------------------
class _CardDumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting every string that a YAML 1.2 parser would read as another type."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if _YAML12_NOT_STR.fullmatch(value):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="'")
    return dumper.represent_str(value)


_CardDumper.add_representer(str, _represent_str)


def eval_result_metadata(
    model_name: str, dataset: str, dataset_label: str, metrics: dict[str, Any]
) -> dict[str, Any]:
    """Front-matter keys (``model_name``, ``eval_results`` -> ``model-index``) for the evaluation of an image
    classifier: ``accuracy`` and, when a number, ``top5_accuracy`` of ``metrics`` (a run's ``metrics.json``),
    unrounded, measured on ``dataset`` (the run's name for it; ``dataset_label`` is how a card shows it).
    Empty when ``metrics`` has no accuracy."""
    hub_dataset = hub_model_id(dataset) if dataset != "offline-default" else None
    results = []
    for key, metric_name in (("accuracy", "Accuracy"), ("top5_accuracy", "Top-5 accuracy")):
        value = metrics.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1:
            results.append(
                EvalResult(
                    task_type="image-classification",
                    task_name="Image Classification",
                    dataset_type=hub_dataset or "imagefolder",
                    dataset_name=_one_line(dataset_label),  # a YAML string: no key can be injected
                    metric_type="accuracy" if key == "accuracy" else "top_5_accuracy",
                    metric_name=metric_name,
                    metric_value=float(value),
                )
            )
    if not results:
        return {}
    return {
        "model_name": _one_line(model_name),
        "eval_results": results,
        "datasets": [hub_dataset] if hub_dataset else None,
    }


def render_card(metadata: dict[str, Any], body: str) -> str:
    """A model card: ``metadata`` as YAML front matter by ``huggingface_hub``'s serializer, then ``body``.

    Raises:
        ValueError: when ``huggingface_hub.ModelCard`` cannot read the result back.
    """
    data = ModelCardData(**{k: v for k, v in metadata.items() if v is not None}).to_dict()
    front = yaml.dump(data, Dumper=_CardDumper, sort_keys=False, allow_unicode=True).strip()
    content = f"---\n{front}\n---\n{body.lstrip(chr(10))}"
    ModelCard(content)  # parsed back: what the Hub and the ecosystem read
    return content


def card_metadata(config: Any, base_model: str | None = None) -> dict[str, Any]:
    """Front-matter keys for an adapter ``config``: library, tags and, for a base model with a Hub id,
    ``base_model`` (a plain ``nn.Module`` or a local folder has none, so none is written)."""
    hub_id = hub_model_id(base_model)
    tags = ["base_model:adapter:" + hub_id] if hub_id else []
    tags += [str(getattr(config, "peft_type", "")).rsplit(".", 1)[-1].lower(), "deltatune", "peft"]
    data: dict[str, Any] = {"library_name": "peft", "tags": [t for t in tags if t]}
    if hub_id:
        data["base_model"] = hub_id
    return data


def _split_front_matter(text: str) -> tuple[str | None, str]:
    """(the front matter's text without the ``---`` fences or None, the rest of the text)."""
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end != -1:
            body_start = text.find("\n", end + 4)
            body = text[body_start + 1 :] if body_start != -1 else ""
            return text[4:end], body
    return None, text


def update_model_card(
    directory: str | os.PathLike[str], config: Any, version: str, base_model: str | None = None
) -> str:
    """Writes or completes ``directory/README.md`` for an adapter saved with ``config`` on ``base_model`` (a
    transformers model's name or path, if any; the config's ``base_model_name_or_path`` comes first, being
    the name a run chose to share); returns its path. An existing card whose front matter is not valid YAML
    or metadata that huggingface_hub cannot read is left as it is (with a warning)."""
    path = os.path.join(directory, MODEL_CARD_NAME)
    base = getattr(config, "base_model_name_or_path", None) or base_model
    existing = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            existing = fh.read()
    front, body = _split_front_matter(existing)
    try:
        present = yaml.safe_load(front) if front else {}
    except yaml.YAMLError:
        present = None
    if not isinstance(present, dict):
        logger.warning("%s has front matter that is not a YAML mapping; it is left as it is", path)
        return path
    missing = {k: v for k, v in card_metadata(config, base).items() if k not in present}
    metadata = {**present, **missing}  # the keys already there are left alone
    if not existing:
        targets = getattr(config, "target_modules", None)
        if isinstance(targets, set | list | tuple):
            targets = ", ".join(sorted(str(t) for t in targets))
        body = _TEMPLATE.format(
            title=md_text(model_display_name(base)) if base else "adapter",
            method=method_display_name(config),
            base_model=md_code(model_display_name(base)) if base else "(not recorded)",
            targets=md_code(targets) if targets else "(not recorded)",
            rank=getattr(config, "r", "?"),
            version=version,
        )
    try:
        text = render_card(metadata, body)
    except (TypeError, ValueError) as error:  # an existing card's metadata huggingface_hub cannot read
        logger.warning("%s is left as it is: its metadata cannot be completed (%s)", path, error)
        return path
    atomic_write_text(path, text)
    return path
