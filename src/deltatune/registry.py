"""The method registry: one :class:`MethodSpec` per adapter method, registered by the method's own module.

This module is a leaf: it imports nothing from deltatune. Each method module calls :func:`register_method`
once; :mod:`deltatune.methods` imports every module in its folder, so a new method is one file there (plus
its tests). Everything that must know the set of methods — config loading, the tuner, the contract tests,
the CLI's ``--method`` choices — asks this registry: :func:`available_methods`, :func:`get_method` by name,
:func:`spec_for` a config object.

Several methods may share one config class (DoRA is ``LoraConfig(use_dora=True)``): a spec with a
``selects`` predicate claims the configs it accepts, and the spec without one (the plain method) takes the
rest.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "MethodSpec",
    "available_methods",
    "get_method",
    "register_method",
    "spec_for",
    "specs_for_peft_type",
]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class MethodSpec:
    """What the library needs to know about one adapter method.

    Attributes:
        name: Short lower-case name used by the CLI and the tests (``"lora"``).
        config_cls: The config dataclass; its ``PEFT_TYPE`` is what ``adapter_config.json`` says.
        layer_cls: The adapter layer class that wraps a targeted module.
        prefix: Prefix shared by the names of the method's adapter tensors (``"lora_"``).
        tuner_cls: The tuner class (None: :class:`deltatune.tuner.AdapterModel`); a method overrides its
            hooks there (extra loss terms, per-step work, save/load adaptation, checkpoint state).
        selects: For a method that shares its config class with another: whether it handles this config
            (DoRA: ``config.use_dora``). None for the class's default method.
        config_defaults: Config fields that select this method when it is chosen by name (DoRA:
            ``{"use_dora": True}``); also PEFT's values for them.
        display_name: How people write it (``"LoRA"``).
        peft_config_name: The class name of the same config in the ``peft`` library (interop and docs).
        example_kwargs: Small config values the contract tests and docs use (ranks that keep tests fast).
        nonzero_init: Config values that make ΔW non-zero at initialisation (so tests can see the adapter).
        listing_order: Where the method appears in listings (``--method`` choices, ``compare`` tables);
            ties keep registration order.
    """

    name: str
    config_cls: type[Any]
    layer_cls: type[Any]
    prefix: str
    tuner_cls: type[Any] | None = None
    selects: Callable[[Any], bool] | None = None
    config_defaults: Mapping[str, Any] = field(default_factory=dict)
    display_name: str = ""
    peft_config_name: str = ""
    example_kwargs: Mapping[str, Any] = field(default_factory=dict)
    nonzero_init: Mapping[str, Any] = field(default_factory=dict)
    listing_order: int = 100

    def __post_init__(self) -> None:
        for name in ("config_defaults", "example_kwargs", "nonzero_init"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        if not self.display_name:
            object.__setattr__(self, "display_name", self.name)
        if not self.peft_config_name:
            object.__setattr__(self, "peft_config_name", self.config_cls.__name__)

    @property
    def peft_type(self) -> str:
        """The ``peft_type`` written in ``adapter_config.json`` (``"LORA"``)."""
        return str(getattr(self.config_cls, "PEFT_TYPE", ""))

    def make_config(self, **kwargs: Any) -> Any:
        """A config of this method: :attr:`config_defaults` plus ``kwargs``."""
        return self.config_cls(**{**self.config_defaults, **kwargs})


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Registers ``spec`` and returns it.

    Raises:
        ValueError: for an invalid name, a name already registered (unless ``replace``), a config class
            without ``PEFT_TYPE``, a selector given without ``config_defaults`` that satisfy it, or a second
            default method for the same config class.
        TypeError: when ``config_cls``, ``layer_cls`` or ``tuner_cls`` is not a class.
    """
    if not _NAME.match(spec.name):
        raise ValueError(f"method name {spec.name!r} must be lower-case letters, digits and underscores")
    for attr in ("config_cls", "layer_cls", "tuner_cls"):
        value = getattr(spec, attr)
        if value is not None and not isinstance(value, type):
            raise TypeError(f"MethodSpec.{attr} of {spec.name!r} must be a class, got {value!r}")
    if not spec.peft_type:
        raise ValueError(f"{spec.config_cls.__name__} has no PEFT_TYPE; cannot register {spec.name!r}")
    if spec.name in _METHODS and not replace:
        raise ValueError(
            f"a method named {spec.name!r} is already registered (pass replace=True to replace it)"
        )
    for other in _METHODS.values():
        if other.name == spec.name or other.config_cls is not spec.config_cls:
            continue
        if other.selects is None and spec.selects is None:
            raise ValueError(
                f"{spec.name!r} and {other.name!r} are both the default method of {spec.config_cls.__name__}; "
                "give one a `selects` predicate"
            )
    if spec.selects is not None and spec.config_defaults:
        probe = spec.make_config()
        if not spec.selects(probe):
            raise ValueError(f"{spec.name!r}: its config_defaults do not satisfy its own `selects` predicate")
    _METHODS[spec.name] = spec
    return spec


def available_methods() -> list[str]:
    """Names of all registered methods, by ``listing_order`` (then registration order)."""
    order = {name: i for i, name in enumerate(_METHODS)}
    return sorted(_METHODS, key=lambda name: (_METHODS[name].listing_order, order[name]))


def get_method(name: str) -> MethodSpec:
    """The spec of method ``name`` (case-insensitive).

    Raises:
        ValueError: if no such method is registered; the message lists the valid names.
    """
    spec = _METHODS.get(str(name).lower())
    if spec is None:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(_METHODS)}")
    return spec


def specs_for_peft_type(peft_type: str) -> list[MethodSpec]:
    """Every registered method whose config writes ``peft_type`` (LoRA and DoRA share ``"LORA"``)."""
    wanted = str(peft_type).upper()
    return [spec for spec in _METHODS.values() if spec.peft_type == wanted]


def spec_for(config: Any) -> MethodSpec:
    """The method that handles ``config``: among the specs of its class (or, for a user's subclass, of the
    nearest registered base class), the one whose ``selects`` accepts it, else the one without a selector.

    Raises:
        ValueError: when no registered method handles the config (naming its class and type), or when two
            selectors both claim it.
    """
    candidates: list[MethodSpec] = []
    for cls in type(config).__mro__:
        candidates = [s for s in _METHODS.values() if s.config_cls is cls]
        if candidates:
            break
    chosen = [s for s in candidates if s.selects is not None and s.selects(config)]
    if len(chosen) > 1:
        raise ValueError(f"{type(config).__name__} is claimed by several methods: {[s.name for s in chosen]}")
    if chosen:
        return chosen[0]
    default = [s for s in candidates if s.selects is None]
    if default:
        return default[0]
    peft_type = getattr(config, "peft_type", None)
    if candidates:
        raise ValueError(
            f"no registered method handles this {type(config).__name__} (methods for it: "
            f"{[s.name for s in candidates]}, none of which accepts its settings)"
        )
    raise ValueError(
        f"{type(config).__name__} (peft_type={peft_type!r}) belongs to no registered method; "
        f"available methods: {', '.join(_METHODS)}"
    )
