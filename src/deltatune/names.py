"""Module-name aliases between transformers 4.x and 5.x, and a model's own config as a plain dict.

transformers 5 renamed many modules (ViT: ``vit.encoder.layer.N.attention.attention.query`` became
``vit.layers.N.attention.q_proj``) and ships the rules to convert old checkpoints. We reuse those
rules, read from the model itself, so that ``target_modules=["query", "value"]`` and adapters saved
against 4.x names work on 5.x models. On transformers 4.x (no rules) names are used as they are.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["NameAliases", "model_config_dict"]


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    """The model's ``config`` as a plain dict (``model_type``, ``tie_word_embeddings``, ``_name_or_path``, ...).

    Reads a transformers config (``to_dict()``), a mapping or a dataclass instance; ``{}`` for a model without
    a config or with one of another kind.
    """
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        data = to_dict()
        return dict(data) if isinstance(data, Mapping) else {}
    if isinstance(config, Mapping):
        return dict(config)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return {}


class NameAliases:
    """Maps a model's module names to their legacy (transformers 4.x) spelling and back.

    Results are memoised in plain dicts, so the object (and a model holding it) stays picklable.

    Args:
        model: The model whose own checkpoint-conversion rules are used.
    """

    def __init__(self, model: nn.Module) -> None:
        self._forward: list[Any] = []
        self._reverse: list[Any] = []
        self._rename: Any = None
        self._legacy_cache: dict[str, str] = {}
        self._modern_cache: dict[str, str] = {}
        try:
            from transformers import PreTrainedModel
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, rename_source_key
        except Exception:  # transformers 4.x, or not installed: no aliases
            return
        if not isinstance(model, PreTrainedModel):
            return
        try:
            transforms = get_model_conversion_mapping(model)
        except Exception as err:  # pragma: no cover - defensive: never fail adapter creation over aliases
            logger.debug("no checkpoint conversion rules for %s: %s", type(model).__name__, err)
            return
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        self._forward = renamings
        self._reverse = [t.reverse_transform() for t in renamings][::-1]
        self._rename = rename_source_key

    @property
    def active(self) -> bool:
        """True when the model has conversion rules (transformers 5.x)."""
        return bool(self._forward)

    def legacy(self, name: str) -> str:
        """The transformers 4.x spelling of module (or key) ``name``; ``name`` itself if none."""
        if not self._reverse:
            return name
        cached = self._legacy_cache.get(name)
        if cached is None:
            cached = self._legacy_cache[name] = self._rename(name, self._reverse, [], reverse=True)[0]
        return cached

    def modern(self, name: str) -> str:
        """The current spelling of a legacy module (or key) ``name``; ``name`` itself if none applies."""
        if not self._forward:
            return name
        cached = self._modern_cache.get(name)
        if cached is None:
            cached = self._modern_cache[name] = self._rename(name, self._forward, [])[0]
        return cached
