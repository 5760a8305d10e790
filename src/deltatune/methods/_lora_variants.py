"""LoRA's variants as PEFT's layers declare them: which config options select a variant of LoRA (DoRA, KaSA, aLoRA,
BD-LoRA, MiCA), and the checks of :meth:`~deltatune.methods._lora_layer.LoraLayerBase.resolve_lora_variant`.

A config field that selects a variant when set says so in its metadata (PEFT's tags): ``is_lora_variant`` (the
variant is named after the field and requested when the value is truthy: ``use_dora``, ``kasa_config``, ...), or
``lora_variants``, a list of the field's values that each name a variant (``init_lora_weights="mica"``). A layer
kind lists the combinations it supports as sorted tuples of those names (``()``: plain LoRA). No torch here.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["declared_variants", "layer_class", "requested_variants", "resolve_variant"]

#: A layer kind's supported combinations: sorted names → None (the kind's own adapters) or a zero-argument
#: factory of the variant (for deltatune's kinds, the layer class that holds that variant's adapters).
VariantTable = Mapping[tuple[str, ...], Callable[[], Any] | None]


def _variant_fields(config: Any) -> Iterable[tuple[dataclasses.Field[Any], list[str] | None]]:
    """The config's fields that select variants, each with its list of naming values (None: a flag field)."""
    for item in dataclasses.fields(config):
        values = item.metadata.get("lora_variants")
        if values is not None:
            yield item, list(values)
        elif item.metadata.get("is_lora_variant"):
            yield item, None


def declared_variants(config: Any) -> set[str]:
    """Every variant name ``config``'s class can request."""
    return {name for item, values in _variant_fields(config) for name in (values or [item.name])}


def requested_variants(config: Any) -> tuple[str, ...]:
    """The variants ``config`` requests, sorted (``()`` for plain LoRA)."""
    chosen: list[str] = []
    for item, values in _variant_fields(config):
        value = getattr(config, item.name)
        if values is None:
            chosen += [item.name] if value else []
        else:
            chosen += [name for name in values if value == name]
    return tuple(sorted(chosen))


def resolve_variant(table: VariantTable, config: Any, layer: str) -> Any:
    """The variant of ``table`` that ``config`` requests, built (``table[key]()``), or None.

    Args:
        table: The layer kind's supported combinations (its ``lora_variants``).
        config: A dataclass config with tagged variant fields (``LoraConfig``).
        layer: The layer's name for the errors (``lora.Linear``).

    Raises:
        ValueError: when a key of ``table`` is not a sorted tuple, names a variant no field of ``config``
            declares, or ``config`` requests a combination the table lacks (naming the ones it has).
    """
    if any(tuple(sorted(key)) != tuple(key) for key in table):
        raise ValueError(
            f"Keys in lora_variants must be sorted tuples, e.g. ('a', 'b'), not ('b', 'a'); {layer} has "
            f"{[k for k in table if tuple(sorted(k)) != tuple(k)]}"
        )
    unknown = {name for key in table for name in key} - declared_variants(config)
    if unknown:
        raise ValueError(
            f"variant(s) {sorted(unknown)} found in lora_variants of {layer}, but no field of "
            f"{type(config).__name__} declares them (metadata 'is_lora_variant', or a value listed in a field's "
            "'lora_variants')"
        )
    wanted = requested_variants(config)
    if wanted not in table:
        raise ValueError(
            f"Invalid or unsupported variant combination: {wanted} for {layer}; it supports "
            f"{', '.join(map(str, table))}"
        )
    factory = table[wanted]
    return None if factory is None else factory()


def layer_class(path: str) -> Callable[[], Any]:
    """A factory of the class at ``"module:Class"``, imported when called (a variant's layer module imports the
    kind's, so the kind names it lazily)."""
    module, _, name = path.partition(":")
    return lambda: getattr(importlib.import_module(module), name)
