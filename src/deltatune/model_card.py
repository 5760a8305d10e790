"""The ``README.md`` model card that ``save_pretrained`` writes next to an adapter, as PEFT does.

A new card gets YAML front matter (``library_name: peft``, since the files are in PEFT's format and load
with it; ``base_model``; tags) and a short template to fill in. An existing card keeps its text; only the
front matter is completed (keys already there are left alone).
"""

from __future__ import annotations

import os
from typing import Any

from ._files import atomic_write_text

__all__ = ["MODEL_CARD_NAME", "card_metadata", "update_model_card"]

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


def card_metadata(config: Any, base_model: str | None = None) -> dict[str, Any]:
    """Front-matter keys for an adapter ``config``: library, tags and, for a Hub/transformers base model,
    ``base_model`` (a plain ``nn.Module`` has no such id, so none is written)."""
    tags = ["base_model:adapter:" + base_model] if base_model else []
    tags += [str(getattr(config, "peft_type", "")).lower(), "deltatune", "peft"]
    data: dict[str, Any] = {"library_name": "peft", "tags": [t for t in tags if t]}
    if base_model:
        data["base_model"] = base_model
    return data


def _split_front_matter(text: str) -> tuple[list[str], str]:
    """(front-matter lines without the ``---`` fences, the rest of the text)."""
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end != -1:
            body_start = text.find("\n", end + 4)
            body = text[body_start + 1 :] if body_start != -1 else ""
            return text[4:end].splitlines(), body
    return [], text


def _yaml_lines(key: str, value: Any) -> list[str]:
    if isinstance(value, list):
        return [f"{key}:", *[f"- {item}" for item in value]]
    return [f"{key}: {value}"]


def update_model_card(
    directory: str | os.PathLike[str], config: Any, version: str, base_model: str | None = None
) -> str:
    """Writes or completes ``directory/README.md`` for an adapter saved with ``config`` on ``base_model`` (a
    transformers model's name or path, if any); returns its path."""
    path = os.path.join(directory, MODEL_CARD_NAME)
    existing = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            existing = fh.read()
    lines, body = _split_front_matter(existing)
    present = {
        line.split(":", 1)[0].strip() for line in lines if ":" in line and not line.startswith((" ", "-"))
    }
    for key, value in card_metadata(config, base_model).items():
        if key not in present:
            lines.extend(_yaml_lines(key, value))
    if not existing:
        targets = getattr(config, "target_modules", None)
        body = _TEMPLATE.format(
            title=getattr(config, "base_model_name_or_path", None) or "adapter",
            method=getattr(config, "peft_type", "?"),
            base_model=getattr(config, "base_model_name_or_path", None) or "(not recorded)",
            targets=", ".join(sorted(targets)) if isinstance(targets, set | list) else targets,
            rank=getattr(config, "r", "?"),
            version=version,
        )
    text = "---\n" + "\n".join(lines) + "\n---\n" + body
    atomic_write_text(path, text)
    return path
