"""Adapter configuration: the base dataclasses every method builds on, and their validation helpers.

- :class:`PeftConfig`: the keys PEFT writes for every method (``peft_type``, ``task_type``, ...).
- :class:`TargetingConfig`: which modules a method adapts (``target_modules``, ``exclude_modules``,
  ``modules_to_save``); every method's config derives from it.
- :class:`LayerSelectionMixin` (``layers_to_transform``, ``layers_pattern``) and :class:`LowRankMixin`
  (``r``, ``rank_pattern``, ``alpha_pattern``), for the methods that have those fields (in
  :mod:`._config_mixins`); :class:`AdapterConfig` is all three, the base of LoRA, LoHa, LoKr and AdaLoRA.
- :class:`TargetSpec`: what one targeted module's adapter is built from (name, config, per-module options).

The JSON layout is PEFT's (sorted keys, sets as lists, ``inference_mode`` written ``true``); unknown keys
are dropped with a warning when loading; ``peft_type`` selects the config class through the method registry.
Each field's help text is written once, in its ``metadata["help"]`` (the CLI's flags read it there).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from . import registry
from ._config_mixins import LayerSelectionMixin, LowRankMixin, help_field
from ._config_types import (
    AdapterConfigNotFoundError,
    MissingConfigKeysError,
    NoMatchingPeftModuleError,
    PeftError,
    PeftTypeName,
    PeftWarning,
    TaskType,
    check_choice,
    check_names,
    check_positive_int,
    check_range,
    name_source,
    pattern_value,
)
from ._files import atomic_write_text, read_json, resolve_file
from ._version import DISTRIBUTION, installed_commit_hash, is_dev_version
from ._version import __version__ as _version

logger = logging.getLogger(__name__)

#: What a new config records as ``peft_version`` (read when the config is made, so a loaded one keeps what it
#: was saved with): ``deltatune-<version>``, so a file says which library wrote it. PEFT's ``peft.config``
#: module holds its own version under this name and records it the same way. A development version gets
#: ``@<commit>`` appended (``@UNKNOWN`` when the install does not say; see :func:`_get_commit_hash`).
__version__ = f"{DISTRIBUTION}-{_version}"

#: The commit an installed distribution was built from, or None (``direct_url.json``; see
#: :func:`deltatune._version.installed_commit_hash`). A module-level name, as in PEFT, so it can be replaced.
_get_commit_hash = installed_commit_hash


def _recorded_version() -> str:
    """The ``peft_version`` a new config records: :data:`__version__`, plus ``@<commit>`` for a development
    version (``@UNKNOWN`` when unknown, with a warning when looking it up failed; a config is never refused
    for this)."""
    version = __version__
    if not is_dev_version(version):
        return version
    try:
        commit = _get_commit_hash(DISTRIBUTION)
    except Exception as err:  # provenance is best effort: never break making a config over it
        warnings.warn(
            "A dev version of PEFT is used but there was an error while trying to determine the commit hash "
            f"({type(err).__name__}: {err}); recording {version}@UNKNOWN as peft_version.",
            UserWarning,
            stacklevel=2,
        )
        commit = None
    return f"{version}@{commit or 'UNKNOWN'}"


__all__ = [
    "CONFIG_NAME",
    "AdapterConfig",
    "AdapterConfigNotFoundError",
    "LayerSelectionMixin",
    "LowRankMixin",
    "MissingConfigKeysError",
    "NoMatchingPeftModuleError",
    "PeftConfig",
    "PeftError",
    "PeftWarning",
    "TargetSpec",
    "TargetingConfig",
    "TaskType",
    "check_choice",
    "check_names",
    "check_positive_int",
    "check_range",
    "config_class_for",
    "help_field",
    "known_peft_types",
    "pattern_value",
]

CONFIG_NAME = "adapter_config.json"


def known_peft_types() -> list[str]:
    """The ``peft_type`` values of every registered method's config, in registration order."""
    return list(dict.fromkeys(registry.get_method(name).peft_type for name in registry.registered_names()))


def _type_name(peft_type: Any) -> str:
    """``peft_type`` as the registry spells it; a string Enum member (PEFT's ``PeftType``) by its value."""
    return (str.__str__(peft_type) if isinstance(peft_type, str) else str(peft_type)).upper()


def config_class_for(peft_type: str) -> type[PeftConfig]:
    """The config class whose ``PEFT_TYPE`` is ``peft_type`` (case-insensitive), from the method registry.

    Raises:
        ValueError: for an unknown type, listing the known ones.
    """
    specs = registry.specs_for_peft_type(peft_type)
    if not specs:
        raise ValueError(
            f"unsupported peft_type {peft_type!r}; deltatune supports: {', '.join(known_peft_types())}"
        )
    return specs[0].config_cls  # type: ignore[no-any-return]


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class PeftConfig:
    """Base of every adapter config; holds the keys PEFT writes for all methods.

    Attributes:
        peft_type: The method (``"LORA"``, ``"IA3"``, ...); set by subclasses.
        task_type: Optional PEFT task type, e.g. ``"SEQ_CLS"`` (adds ``classifier``/``score`` to
            ``modules_to_save``).
        base_model_name_or_path: Hub id or path of the base model; filled from ``model.name_or_path``.
        revision: Revision of the base model.
        inference_mode: Whether the adapter is loaded frozen; always written ``true``.
        auto_mapping: ``{"base_model_class", "parent_library"}``, written when ``task_type`` is None.
        peft_version: Version of the library that wrote the file: filled when the config is made
            (``deltatune-<version>``, see :data:`__version__`); a loaded config keeps the one in its file.
    """

    peft_type: str | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    auto_mapping: dict[str, Any] | None = None
    peft_version: str | None = field(default=None)

    def __post_init__(self) -> None:
        if self.task_type is not None:
            if self.task_type not in list(TaskType):
                raise ValueError(
                    f"Invalid task type: '{self.task_type}'. Must be one of the following task types: "
                    f"{', '.join(TaskType)}. (task_type={self.task_type!r})"
                )
            self.task_type = TaskType(self.task_type).value
        if self.peft_version is None:  # PEFT fills it when the config is created; a loaded one keeps its own
            self.peft_version = _recorded_version()

    # ---- dict / JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Returns the config as a JSON-ready dict (sets become sorted lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json_string(self, inference_mode: bool | None = None) -> str:
        """The exact text of ``adapter_config.json`` (sorted keys, sets as sorted lists).

        Args:
            inference_mode: Value to write instead of the config's (``PeftModel.save_pretrained`` writes
                ``True``, as PEFT does; ``PeftConfig.save_pretrained`` writes the config's own value).
        """
        data = self.to_dict()
        if inference_mode is not None:
            data["inference_mode"] = inference_mode
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Builds the right config subclass from a dict (as read from ``adapter_config.json``).

        Unknown keys are dropped with a warning. ``peft_type`` is required unless called on a concrete
        subclass.

        Raises:
            ValueError: if ``data`` is not a dict, lacks ``peft_type``, names an unknown type, or holds
                invalid values.
        """
        if not isinstance(data, dict):
            raise ValueError(f"an adapter config must be a JSON object, got {type(data).__name__}")
        target: type[PeftConfig] = cls
        peft_type = data.get("peft_type")
        foreign = set(data) - {f.name for f in dataclasses.fields(cls)}
        if peft_type is None and (cls is PeftConfig or foreign):
            raise MissingConfigKeysError(
                f"The {cls.__name__} config that is trying to be loaded is missing required keys: {{'peft_type'}}. "
                f"It has no 'peft_type' (expected one of {', '.join(known_peft_types())}): not an adapter config."
            )
        if cls is PeftConfig and peft_type is not None:
            if not isinstance(peft_type, str):
                raise ValueError(f"'peft_type' must be a string, got {peft_type!r}")
            target = config_class_for(peft_type)
        elif peft_type is not None and _type_name(peft_type) != getattr(cls, "PEFT_TYPE", None):
            raise ValueError(f"config says peft_type={peft_type!r} but {cls.__name__} was asked to load it")
        names = {f.name for f in dataclasses.fields(target) if f.init}
        unknown = sorted(set(data) - names - {"peft_type"})
        if unknown:  # PEFT's warning (its first sentence is what its users and tests match)
            warnings.warn(
                f"Unexpected keyword arguments {unknown} for class {target.__name__}, these are ignored. The file "
                "was probably written by a newer version of PEFT or deltatune; upgrading is recommended.",
                stacklevel=3,
            )
        kwargs = {k: v for k, v in data.items() if k in names}
        try:
            return target(**kwargs)
        except TypeError as err:  # a value of the wrong type deep inside a dataclass: name the key(s)
            culprits = [
                f"{key}={value!r}" for key, value in kwargs.items() if _refused_alone(target, key, value)
            ]
            named = f" ({', '.join(culprits)})" if culprits else ""
            raise ValueError(f"invalid adapter config{named}: {err}") from err

    # ---- files ----------------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | os.PathLike[str], inference_mode: bool | None = None, **kwargs: Any
    ) -> None:
        """Writes ``adapter_config.json`` into ``save_directory`` atomically (``inference_mode`` as the config
        has it, unless given).

        Raises:
            ValueError: if ``save_directory`` is a file.
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {os.fspath(save_directory)!r} is a file, not a directory")
        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), self.to_json_string(inference_mode))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str], **kwargs: Any) -> dict[str, Any]:
        """The JSON object in ``path`` as a dict (PEFT's contract; :meth:`from_dict` builds the config). A
        ``runtime_config`` entry, which is never meant to be saved, is dropped.

        Raises:
            FileNotFoundError: if the file is missing.
            ValueError: if it is not valid JSON or not a JSON object.
        """
        data = read_json(path, "adapter config")
        if not isinstance(data, dict):
            raise ValueError(
                f"{os.fspath(path)} holds a JSON {type(data).__name__}, not an adapter config object"
            )
        data.pop("runtime_config", None)
        return data

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        subfolder: str | None = None,
        **hub_kwargs: Any,
    ) -> PeftConfig:
        """Loads ``adapter_config.json`` from a local directory or a Hugging Face Hub repo id.

        Raises:
            AdapterConfigNotFoundError: when there is no such file (a ``FileNotFoundError`` and ``ValueError``).
            MissingConfigKeysError: when the JSON is not an adapter config (no ``peft_type``).
            ValueError: for invalid values.

        The errors of an invalid file end with `` (in <path of the file>)``; their type and text are
        :meth:`from_dict`'s.
        """
        try:
            path = resolve_file(pretrained_model_name_or_path, CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
        except FileNotFoundError as err:
            raise AdapterConfigNotFoundError(
                f"Can't find '{CONFIG_NAME}' at '{os.fspath(pretrained_model_name_or_path)}': {err}"
            ) from err
        data = cls.from_json_file(path)
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:  # name the file: a key alone does not say which adapter
            name_source(err, os.fspath(path))
            raise

    # ---- helpers for subclasses -----------------------------------------------------------------
    @property
    def is_prompt_learning(self) -> bool:
        """Always False: deltatune has no prompt-learning methods (kept for API compatibility)."""
        return False


def _refused_alone(config_cls: type[PeftConfig], key: str, value: Any) -> bool:
    """Whether ``config_cls(key=value)``, every other field at its default, raises a ``TypeError`` (which key of
    a config that failed to build holds a value of the wrong type)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config_cls(**{key: value})
        except TypeError:
            return True
        except (
            Exception
        ):  # another complaint (a value out of range, a missing companion field): not a type error
            return False
    return False


@dataclass(frozen=True)
class TargetSpec:
    """What one targeted module's adapter is built from: the module's name (and its other spellings), the
    config, and the options the config resolves for it (:meth:`TargetingConfig.module_options`: ``r`` and
    ``alpha`` after the patterns for a low-rank method, ``is_feedforward`` for IA³)."""

    module_name: str
    name_variants: tuple[str, ...]
    config: TargetingConfig
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class TargetingConfig(PeftConfig):
    """The fields every method shares: which modules it adapts and what it trains in full.

    A method's config derives from this (with :class:`LayerSelectionMixin` when it can be limited to some
    layers, and :class:`LowRankMixin` when it is low-rank) and declares its
    ``PEFT_TYPE``; its class attributes tell generic code how to treat it (CLI aliases, recipe defaults,
    default targets per model type).
    """

    target_modules: list[str] | set[str] | str | None = help_field(
        "Modules to adapt: a list of names (an exact name or a '.name' suffix), a regex string (full match), "
        "or 'all-linear'. Transformers 4.x names such as 'query' also work on 5.x models.",
        None,
    )
    exclude_modules: list[str] | set[str] | str | None = help_field(
        "Modules never adapted, in the same forms as target_modules.", None
    )
    modules_to_save: list[str] | None = help_field(
        "Modules trained in full and saved with the adapter, for example 'classifier'.", None
    )

    #: Name of the field that holds the scale numerator (``lora_alpha`` or ``alpha``); None: no such field.
    ALPHA_FIELD: ClassVar[str | None] = None
    #: Fields that list target module names: saved in this model's spelling when legacy names matched.
    MODULE_LIST_FIELDS: ClassVar[tuple[str, ...]] = ("target_modules",)
    #: Name of the field the CLI's ``--dropout`` sets (None: the method has no dropout).
    DROPOUT_FIELD: ClassVar[str | None] = None
    #: Command-line flags this method reads differently: ``{flag: (field, notice logged when used)}``.
    FLAG_ALIASES: ClassVar[dict[str, tuple[str, str]]] = {}
    #: ``target_modules`` used when none are given, per transformers ``model_type`` (PEFT's defaults).
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = {}
    #: The guide's settings for this method (``deltatune train``'s defaults; the user's flags override them).
    RECIPE_DEFAULTS: ClassVar[dict[str, Any]] = {}
    PEFT_TYPE: ClassVar[str] = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.peft_type is not None and _type_name(self.peft_type) != self.PEFT_TYPE:
            # PEFT overwrites any given peft_type with the class's own; deltatune does too, and says so
            warnings.warn(
                f"peft_type={self.peft_type!r} does not match {type(self).__name__}; it is set to "
                f"{self.PEFT_TYPE!r}",
                PeftWarning,
                stacklevel=2,
            )
        self.peft_type = PeftTypeName(self.PEFT_TYPE)  # canonical spelling ("lora" → "LORA"), with .value
        self.target_modules = check_names("target_modules", self.target_modules)
        self.exclude_modules = check_names("exclude_modules", self.exclude_modules)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            if not all(isinstance(v, str) for v in self.modules_to_save):
                raise ValueError(
                    f"modules_to_save must be a list of module names, got {self.modules_to_save!r}"
                )
            self.modules_to_save = list(self.modules_to_save)

    def module_options(self, module_names: list[str]) -> dict[str, Any]:
        """The per-module options of the module called ``module_names`` (its spellings); none by default. A
        method whose adapter differs per module (ranks from a pattern, feed-forward modules) adds them."""
        return {}

    def target_spec(self, module_name: str, module_names: list[str]) -> TargetSpec:
        """The :class:`TargetSpec` an adapter layer for ``module_name`` is built from."""
        return TargetSpec(module_name, tuple(module_names), self, self.module_options(module_names))

    def fill_model_defaults(self, model_type: str | None) -> bool:
        """Fills ``target_modules`` (and whatever else a method derives from it) from the defaults for the
        transformers ``model_type``; returns False when there are none."""
        defaults = self.DEFAULT_TARGET_MODULES.get(str(model_type)) if model_type else None
        if defaults is None:
            return False
        self.target_modules = defaults if isinstance(defaults, str) else set(defaults)
        return True

    @classmethod
    def recipe_defaults(cls, planned_steps: int, given: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments ``deltatune train`` uses for this method when the user did not give them.

        Args:
            planned_steps: The optimiser steps the run will take.
            given: What the user gave (not to be overridden).

        Returns:
            :attr:`RECIPE_DEFAULTS` by default; a method whose settings depend on the run's length (AdaLoRA's
            schedule) adds those.
        """
        return dict(cls.RECIPE_DEFAULTS)

    def allocated_ranks(self) -> dict[str, int]:
        """The config values that size the adapter's tensors, by field name (none by default). Loading checks
        each against the dimensions in the weights file before allocating anything, so a hostile
        ``"r": 4000000`` fails at once."""
        return {}

    def check_fits_run(self, planned_steps: int) -> None:
        """Raises ``ValueError`` when this config cannot work for a run of ``planned_steps`` optimiser steps
        (checked before any training; default: always fits)."""


@dataclass
class AdapterConfig(LowRankMixin, LayerSelectionMixin, TargetingConfig):
    """The base of the low-rank methods (LoRA, LoHa, LoKr, AdaLoRA): targeting, the layers to adapt, and a
    rank and alpha."""
