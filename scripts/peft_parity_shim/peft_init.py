"""Stand-in for peft: its public names point at deltatune (see scripts/peft_parity.py)."""

import importlib

import _parity_markers as _m
from _parity_finder import _MISSING, PEFT_MODULES, deltatune_public

__version__ = "0.21.2"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    if f"peft.{name}" in PEFT_MODULES:  # `import peft; peft.tuners...`
        return importlib.import_module(f"peft.{name}")
    value = deltatune_public(name)
    if value is _MISSING:
        value = _m.placeholder_for(name)
    globals()[name] = value
    return value
