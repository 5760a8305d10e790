"""Test-only settings per method: small ranks that keep the tests fast (``example_kwargs``) and config values
that make an adapter non-zero at initialisation (``nonzero_init``), so tests can see it.

A method without an entry here takes the ``EXAMPLE_KWARGS`` its own test module (``tests/test_<name>.py``)
declares, else its config's defaults; it is made non-zero by setting every ``init_*weights`` field of its
config to False (the convention of PEFT's methods: ``init_lora_weights``, ``init_weights``,
``init_ia3_weights``). So a new method joins the contract suite with no edit here.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
from typing import Any

import deltatune

#: Small config values per method (ranks that keep tests fast).
EXAMPLE_KWARGS: dict[str, dict[str, Any]] = {
    "lora": {"r": 4, "lora_alpha": 8},
    "dora": {"r": 4, "lora_alpha": 8},
    "loha": {"r": 3, "alpha": 6},
    "lokr": {"r": 2, "alpha": 4},
    "adalora": {"init_r": 6, "target_r": 2, "lora_alpha": 8, "total_step": 20},
}

_INIT_FIELD = re.compile(r"^init(_\w+)?_weights$")


def example_kwargs(method: str) -> dict[str, Any]:
    """Small config values for ``method``: this table's entry, else ``EXAMPLE_KWARGS`` of ``test_<method>.py``,
    else none (its defaults)."""
    if method in EXAMPLE_KWARGS:
        return dict(EXAMPLE_KWARGS[method])
    if importlib.util.find_spec(f"test_{method}") is None:
        return {}
    return dict(getattr(importlib.import_module(f"test_{method}"), "EXAMPLE_KWARGS", {}))


def nonzero_init(method: str) -> dict[str, Any]:
    """Config values that make ``method``'s adapter non-zero at initialisation: its ``init_*weights`` fields
    set to False."""
    cls = deltatune.get_method(method).config_cls
    found = {f.name: False for f in dataclasses.fields(cls) if _INIT_FIELD.match(f.name)}
    assert found, f"{method}: no init_*weights field to make the adapter non-zero at init"
    return found
