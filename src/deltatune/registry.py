"""The method registry: one entry per adapter method.

Everything that must know the set of methods (config loading, the contract tests, the CLI's
``--method`` choices) reads it from here, so a new method is one file that calls
:func:`register_method` plus its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import PeftConfig
    from .layers import AdapterLayer

__all__ = ["MethodSpec", "available_methods", "get_method", "method_for_peft_type", "register_method"]


@dataclass(frozen=True)
class MethodSpec:
    """What the library needs to know about one adapter method.

    Attributes:
        name: Short lower-case name used by the CLI (``"lora"``).
        peft_type: The ``peft_type`` string written in ``adapter_config.json`` (``"LORA"``).
        config_cls: The config dataclass.
        layer_cls: The adapter layer class that wraps a targeted module.
        prefix: Prefix shared by the names of the method's adapter tensors (``"lora_"``).
        model_cls: The tuner class (default :class:`deltatune.inject.AdapterModel`); AdaLoRA adds its
            rank allocator there.
    """

    name: str
    peft_type: str
    config_cls: type[PeftConfig]
    layer_cls: type[AdapterLayer]
    prefix: str
    model_cls: type | None = None


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Registers ``spec`` under its name; re-registering the same name replaces it."""
    _METHODS[spec.name] = spec
    return spec


def _ensure_builtin() -> None:
    # Importing the package registers the built-in methods; this covers direct imports of submodules.
    from . import methods  # noqa: F401


def available_methods() -> list[str]:
    """Names of all registered methods, in registration order."""
    _ensure_builtin()
    return list(_METHODS)


def get_method(name: str) -> MethodSpec:
    """Returns the spec of method ``name`` (case-insensitive).

    Raises:
        ValueError: if no such method is registered; the message lists the valid names.
    """
    _ensure_builtin()
    spec = _METHODS.get(name.lower())
    if spec is None:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(_METHODS)}")
    return spec


def method_for_peft_type(peft_type: str) -> MethodSpec:
    """Returns the spec whose ``peft_type`` is ``peft_type`` (``"LORA"`` ...).

    Raises:
        ValueError: if the type is unknown; the message lists the supported types.
    """
    _ensure_builtin()
    for spec in _METHODS.values():
        if spec.peft_type == str(peft_type).upper():
            return spec
    known = ", ".join(s.peft_type for s in _METHODS.values())
    raise ValueError(f"unsupported peft_type {peft_type!r}; deltatune supports: {known}")


def method_for_config(config: PeftConfig) -> MethodSpec:
    """Returns the spec that owns ``config``'s class.

    Raises:
        ValueError: if the config has no ``peft_type`` or an unknown one.
    """
    if config.peft_type is None:
        raise ValueError(f"{type(config).__name__} has no peft_type; expected an adapter method's config")
    return method_for_peft_type(config.peft_type)
