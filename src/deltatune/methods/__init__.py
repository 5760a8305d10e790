"""Built-in adapter methods: one module per method, each registering itself on import.

Importing this package imports every public module in this folder (``lora``, ``loha``, ...; names starting
with ``_`` are private helpers), so adding a method is adding its file: there is no list to keep in sync.
"""

from __future__ import annotations

import importlib
import pkgutil

__all__: list[str] = []

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
