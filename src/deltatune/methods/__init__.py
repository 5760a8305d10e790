"""Built-in adapter methods: one module per method, each registering itself on import.

Importing this package imports every public module in this folder (``lora``, ``loha``, ...; names starting
with ``_`` are private helpers), so adding a method is adding its file: there is no list to keep in sync.
"""

from __future__ import annotations

import pkgutil

from ..registry import import_method_modules

__all__: list[str] = []

import_method_modules(__name__, pkgutil.iter_modules(__path__))
