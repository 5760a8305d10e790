"""The method registry: one :class:`MethodSpec` per adapter method, registered by the method's own module.

This module is a leaf: it imports nothing from deltatune, and neither torch nor transformers. Each public
module of :mod:`deltatune.methods` holds a method's config dataclass and one :func:`register_method` call,
and imports no torch; the spec names the method's layer classes (and tuner) by ``"module:Class"`` path,
imported on first use (:attr:`MethodSpec.layer_cls`). :func:`load_methods` imports those modules (the
lookups below call it), so the CLI can list the methods and their config fields without importing torch.

This is the one registry: config loading (``peft_type`` → config class), the tuner (which layer class
wraps which module), serialization (the tensor names of a method), the package's exports, the contract
tests and the CLI's ``--method`` choices and flags all ask it: :func:`available_methods`,
:func:`get_method` by name, :func:`spec_for` a config object, :func:`specs_for_peft_type`.

Several methods may share one config class (DoRA is ``LoraConfig(use_dora=True)``): a spec with a
``selects`` predicate claims the configs it accepts, and the spec without one (the plain method) takes the
rest.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "MethodSpec",
    "available_methods",
    "get_method",
    "import_method_modules",
    "load_methods",
    "register_method",
    "registered_names",
    "spec_for",
    "specs_for_peft_type",
]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
#: The package whose public modules are the built-in methods (imported by :func:`load_methods`).
BUILTIN_METHODS = "deltatune.methods"


@functools.cache
def _resolve(path: str) -> Any:
    """The object a ``"package.module:Name"`` path names (imported on first use, then cached)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class MethodSpec:
    """What the library needs to know about one adapter method.

    Attributes:
        name: Short lower-case name used by the CLI and the tests (``"lora"``).
        config_cls: The config dataclass; its ``PEFT_TYPE`` is what ``adapter_config.json`` says. It lives in
            a module that imports no torch, so the config can be read without it.
        layer: ``"module:Class"`` path of the adapter layer class that wraps a targeted module (imported on
            first use: :attr:`layer_cls`).
        layer_kinds: Paths of further layer classes for the module types whose adapter holds other tensors
            (LoRA's ``nn.Embedding``: ``lora_embedding_A``); each wraps the types in its ``supported_layers``.
        prefix: Prefix shared by the names of the method's adapter tensors (``"lora_"``).
        tuner: Path of the tuner class (None: :class:`deltatune.tuner.AdapterModel`); a method overrides its
            hooks there (extra loss terms, per-step work, save/load adaptation, checkpoint state).
        selects: For a method that shares its config class with another: whether it handles this config
            (DoRA: ``config.use_dora``). None for the class's default method.
        config_defaults: Config fields that select this method when it is chosen by name (DoRA:
            ``{"use_dora": True}``); also PEFT's values for them.
        display_name: How people write it (``"LoRA"``).
        peft_config_name: The class name of the same config in the ``peft`` library (interop and docs).
        extends: The method this one builds on and may import (DoRA and AdaLoRA: ``"lora"``); any other
            method's modules are off limits (checked by the architecture tests).
        listing_order: Where the method appears in listings (``--method`` choices, ``compare`` tables);
            ties keep registration order.
        listed: False for a method that is not a general-purpose adapter (PEFT's trainable tokens adapt an
            embedding's rows only): it loads, exports and works like any other, but
            :func:`available_methods` (the CLI's choices, ``compare``, the contract suite) leaves it out.
    """

    name: str
    config_cls: type[Any]
    layer: str
    prefix: str
    layer_kinds: tuple[str, ...] = ()
    tuner: str | None = None
    selects: Callable[[Any], bool] | None = None
    config_defaults: Mapping[str, Any] = field(default_factory=dict)
    display_name: str = ""
    peft_config_name: str = ""
    extends: str | None = None
    listing_order: int = 100
    listed: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "config_defaults", _frozen(self.config_defaults))
        object.__setattr__(self, "layer_kinds", tuple(self.layer_kinds))
        if not self.display_name:
            object.__setattr__(self, "display_name", self.name)
        if not self.peft_config_name:
            object.__setattr__(self, "peft_config_name", self.config_cls.__name__)

    @property
    def layer_cls(self) -> Any:
        """The adapter layer class (imports the method's layer module, and with it torch, on first use)."""
        return _resolve(self.layer)

    @property
    def tuner_cls(self) -> Any:
        """The tuner class, or None for the generic :class:`deltatune.tuner.AdapterModel`."""
        return None if self.tuner is None else _resolve(self.tuner)

    def layer_classes(self) -> tuple[Any, ...]:
        """The main layer class and every layer kind (for listings of tensor names and type checks)."""
        return (self.layer_cls, *(_resolve(path) for path in self.layer_kinds))

    def layer_class_for(self, base_layer: Any) -> Any:
        """The layer class that wraps ``base_layer``: the first kind that supports its type, else the main
        class."""
        for path in self.layer_kinds:
            kind = _resolve(path)
            if isinstance(base_layer, kind.supported_layers):
                return kind
        return self.layer_cls

    @property
    def supported_layers(self) -> tuple[type[Any], ...]:
        """The module types this method can adapt (its main layer class's ``supported_layers``)."""
        return tuple(self.layer_cls.supported_layers)

    def wrong_layers_message(self, wrong: list[tuple[str, type[Any]]]) -> str:
        """The error for targeted modules (name, type) this method cannot adapt; where the method it extends
        can, PEFT's sentence first ("MultiheadAttention does not support DoRA (yet), please set use_dora to
        False")."""
        shown = ", ".join(f"{name} ({kind.__name__})" for name, kind in wrong[:5])
        supported = ", ".join(t.__name__ for t in self.supported_layers)
        message = (
            f"{self.name} cannot adapt {shown}{' …' if len(wrong) > 5 else ''}; supported layer types: "
            f"{supported}. Narrow target_modules to layers of those types."
        )
        if self.extends and self.config_defaults:
            parent = get_method(self.extends)
            parent_ok = [
                k
                for _, k in wrong
                if any(issubclass(k, t) for c in parent.layer_classes() for t in c.supported_layers)
            ]
            if parent_ok:
                flags = " and ".join(f"{flag} to False" for flag in self.config_defaults)
                message = (
                    f"{parent_ok[0].__name__} does not support {self.display_name} (yet), please set {flags}. "
                    + message
                )
        return message

    def adapter_param_names(self) -> tuple[str, ...]:
        """The adapter tensor names of every layer class of this method."""
        return tuple(dict.fromkeys(n for c in self.layer_classes() for n in c.adapter_param_names))

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
            without ``PEFT_TYPE``, a layer or tuner path not of the form ``"module:Class"``, a ``selects``
            predicate that rejects the method's own config (:meth:`MethodSpec.make_config`: the class's
            defaults plus ``config_defaults``, which may be empty), or a second default method for the same
            config class.
        TypeError: when ``config_cls`` is not a class.
    """
    if not _NAME.match(spec.name):
        raise ValueError(f"method name {spec.name!r} must be lower-case letters, digits and underscores")
    if not isinstance(spec.config_cls, type):
        raise TypeError(f"MethodSpec.config_cls of {spec.name!r} must be a class, got {spec.config_cls!r}")
    for path in (spec.layer, *spec.layer_kinds, *([spec.tuner] if spec.tuner else [])):
        if not isinstance(path, str) or not _PATH.match(path):
            raise ValueError(
                f"MethodSpec of {spec.name!r}: {path!r} is not a 'package.module:Class' path of a layer or tuner"
            )
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
    if spec.selects is not None and not spec.selects(spec.make_config()):
        made_from = (
            "its config_defaults" if spec.config_defaults else "the config's defaults (no config_defaults)"
        )
        raise ValueError(f"{spec.name!r}: {made_from} do not satisfy its own `selects` predicate")
    _METHODS[spec.name] = spec
    return spec


_loaded = False
_loading = False


def import_method_modules(package: str, modules: Iterable[pkgutil.ModuleInfo]) -> None:
    """Imports the public ones (no leading ``_``) of ``modules``, the modules a method package found in its
    folder (``pkgutil.iter_modules(__path__)``); the package's ``__init__`` calls this, so adding a method is
    adding its file.

    Raises:
        ImportError: naming the module that failed, chained to its error.
    """
    for module in modules:
        if module.name.startswith("_"):
            continue
        name = f"{package}.{module.name}"
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise ImportError(f"method module {name} failed to import: {exc}", name=name) from exc


def load_methods() -> None:
    """Imports the built-in methods (each public module of :mod:`deltatune.methods` registers one or more),
    once. Neither torch nor transformers is imported: a method's layers load on first use.

    The registry counts as loaded only once every import succeeded: a failure propagates (an
    ``ImportError`` naming the module) and the next lookup tries again, so none answers from the methods
    that happened to register before it.
    """
    global _loaded, _loading
    if _loaded or _loading:  # _loading: a lookup made while the methods import (they are partly there)
        return
    _loading = True
    try:
        importlib.import_module(BUILTIN_METHODS)
        _loaded = True
    finally:
        _loading = False


def registered_names() -> list[str]:
    """Names of the registered methods, in registration order (loading the built-in ones first)."""
    load_methods()
    return list(_METHODS)


def available_methods() -> list[str]:
    """Names of the listed registered methods (see :attr:`MethodSpec.listed`), by ``listing_order`` (then
    registration order)."""
    load_methods()
    order = {name: i for i, name in enumerate(_METHODS)}
    listed = [name for name, spec in _METHODS.items() if spec.listed]
    return sorted(listed, key=lambda name: (_METHODS[name].listing_order, order[name]))


def get_method(name: str) -> MethodSpec:
    """The spec of method ``name`` (case-insensitive).

    Raises:
        ValueError: if no such method is registered; the message lists the valid names.
    """
    load_methods()
    spec = _METHODS.get(str(name).lower())
    if spec is None:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(_METHODS)}")
    return spec


def specs_for_peft_type(peft_type: str) -> list[MethodSpec]:
    """Every registered method whose config writes ``peft_type`` (LoRA and DoRA share ``"LORA"``)."""
    load_methods()
    # a string Enum member (PEFT's PeftType, in peft's ``config.to_dict()``) by its value, not "PeftType.LORA"
    wanted = (str.__str__(peft_type) if isinstance(peft_type, str) else str(peft_type)).upper()
    return [spec for spec in _METHODS.values() if spec.peft_type == wanted]


def spec_for(config: Any) -> MethodSpec:
    """The method that handles ``config``: among the specs of its class (or, for a user's subclass, of the
    nearest registered base class), the one whose ``selects`` accepts it, else the one without a selector.

    Raises:
        ValueError: when no registered method handles the config (naming its class and type), or when two
            selectors both claim it.
    """
    load_methods()
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
