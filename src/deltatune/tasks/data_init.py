"""Attaching an adapter whose initialisation is computed from data (PEFT's EVA and CorDA): the recipe hands the
library's function a few training batches.

The config class says which initialisers need data and how (``DATA_INITS``: value → when the library function
runs, before or after ``get_peft_model``, and its name in the package), so this module names no method. A
function the installed library lacks is one clear error.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..model import get_peft_model

logger = logging.getLogger(__name__)

__all__ = ["attach_configured", "data_init_of", "sample_batches"]

#: Training images the data-driven initialisers see (PEFT's examples use a few batches).
SAMPLE_IMAGES = 256


def data_init_of(config: Any) -> tuple[str, str, str, str] | None:
    """``(field, value, when, function name)`` when ``config``'s initialisation needs data (a field of its
    ``FLAG_CHOICES`` holds a value its ``DATA_INITS`` lists), else None."""
    table: dict[str, tuple[str, str]] = getattr(type(config), "DATA_INITS", {})
    for name in getattr(type(config), "FLAG_CHOICES", {}):
        value = getattr(config, name, None)
        if isinstance(value, str) and value in table:
            return (name, value, *table[value])
    return None


def sample_batches(
    dataset: Any, collate: Callable[[list[Any]], Any], batch_size: int
) -> list[dict[str, Any]]:
    """Up to :data:`SAMPLE_IMAGES` training examples, collated into batches of ``batch_size``, as model inputs
    (labels dropped; a collate's ``device_transform`` applied on the CPU)."""
    n = min(len(dataset), SAMPLE_IMAGES)
    transform = getattr(collate, "device_transform", None)
    batches = []
    for start in range(0, n, max(batch_size, 1)):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, n))])
        if transform is not None:
            batch = transform(batch, torch.device("cpu"))
        batches.append({k: v for k, v in dict(batch).items() if k not in ("labels", "label")})
    return batches


def _library_function(name: str, setting: str) -> Callable[..., Any]:
    package = importlib.import_module("deltatune")
    function = getattr(package, name, None)
    if function is None:
        raise ValueError(f"{setting} needs deltatune.{name}, which this version of the library lacks")
    return function  # type: ignore[no-any-return]


def attach_configured(
    base: nn.Module, config: Any, sample: Callable[[], list[dict[str, Any]]] | None
) -> nn.Module:
    """``get_peft_model(base, config)``; for an initialiser computed from data, with the library's function run
    on ``sample()`` (before: on the base model's forward passes; after: on the adapted model's)."""
    plan = data_init_of(config)
    if plan is None:
        return get_peft_model(base, config)
    field, value, when, name = plan
    setting = f"{field}={value!r}"
    function = _library_function(name, setting)
    if sample is None:
        raise ValueError(f"{setting} is computed from data; pass training batches")
    batches = sample()
    logger.info("initialising the adapter from %d training batches (%s)", len(batches), value)
    if when == "before":

        @torch.no_grad()
        def run_model() -> None:
            for batch in batches:
                base(**batch)

        function(base, config, run_model=run_model)
        return get_peft_model(base, config)
    model = get_peft_model(base, config)
    function(
        model,
        dataloader=batches,
        forward_fn=lambda m, inputs: m(**inputs),
        prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=None,
        show_progress_bar=False,
    )
    return model
