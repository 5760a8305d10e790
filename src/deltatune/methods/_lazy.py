"""Lazy attribute access for the method modules: a method's public module holds its config and its
registration and imports no torch; its maths and layer classes live in private sibling modules, reached
through the public module's names on first use (``from deltatune.methods.lora import LoraLayer`` works)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["forward_attributes"]


def forward_attributes(module_name: str, *modules: str) -> Callable[[str], Any]:
    """A ``__getattr__`` (PEP 562) for the module ``module_name`` that looks ``name`` up in ``modules`` (names
    relative to its package, ``"._lora_layer"``), importing them on first use.

    Raises:
        AttributeError: from the returned function, when none of the modules has the name.
    """

    package = module_name.rpartition(".")[0]

    def __getattr__(name: str) -> Any:
        if not name.startswith("__"):
            for module in modules:
                found = importlib.import_module(module, package)
                if hasattr(found, name):
                    return getattr(found, name)
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    return __getattr__
