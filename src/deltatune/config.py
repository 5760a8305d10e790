"""Adapter configuration: the base dataclasses and their validation helpers.

The JSON layout is PEFT's: ``json.dumps(asdict(config), indent=2, sort_keys=True)`` with sets written
as lists and ``inference_mode`` always ``true``. Unknown keys are dropped with a warning when loading.
``peft_type`` selects the config class: every subclass that declares its own ``PEFT_TYPE`` is recorded
when it is defined (:func:`config_class_for`), so this module needs no method registry. Reading and writing
files goes through :mod:`deltatune._files`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._config_types import (
    AdapterConfigNotFoundError,
    MissingConfigKeysError,
    PeftTypeName,
    PeftWarning,
    TaskType,
    check_choice,
    check_positive_int,
    check_range,
    pattern_value,
)
from ._files import atomic_write_text, read_json, resolve_file
from ._version import __version__ as _version

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME",
    "AdapterConfig",
    "AdapterConfigNotFoundError",
    "MissingConfigKeysError",
    "PeftConfig",
    "PeftWarning",
    "TaskType",
    "check_choice",
    "check_positive_int",
    "check_range",
    "config_class_for",
    "known_peft_types",
    "pattern_value",
]

CONFIG_NAME = "adapter_config.json"

#: ``PEFT_TYPE`` → the config class that declared it (filled by ``PeftConfig.__init_subclass__``).
_CONFIG_TYPES: dict[str, type[PeftConfig]] = {}


def known_peft_types() -> list[str]:
    """The ``peft_type`` values of every config class defined so far, in definition order."""
    return list(_CONFIG_TYPES)


def config_class_for(peft_type: str) -> type[PeftConfig]:
    """The config class whose ``PEFT_TYPE`` is ``peft_type`` (case-insensitive).

    Raises:
        ValueError: for an unknown type, listing the known ones.
    """
    cls = _CONFIG_TYPES.get(str(peft_type).upper())
    if cls is None:
        raise ValueError(
            f"unsupported peft_type {peft_type!r}; deltatune supports: {', '.join(_CONFIG_TYPES)}"
        )
    return cls


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
        peft_type: The method (``"LORA"``, ``"LOHA"``, ``"LOKR"``, ``"ADALORA"``); set by subclasses.
        task_type: Optional PEFT task type, e.g. ``"SEQ_CLS"`` (adds ``classifier``/``score`` to
            ``modules_to_save``).
        base_model_name_or_path: Hub id or path of the base model; filled from ``model.name_or_path``.
        revision: Revision of the base model.
        inference_mode: Whether the adapter is loaded frozen; always written ``true``.
        auto_mapping: ``{"base_model_class", "parent_library"}``, written when ``task_type`` is None.
        peft_version: Version of the library that wrote the file.
    """

    peft_type: str | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    auto_mapping: dict[str, Any] | None = None
    peft_version: str | None = field(default=None)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        peft_type = cls.__dict__.get("PEFT_TYPE")
        if peft_type:
            previous = _CONFIG_TYPES.get(peft_type)
            if previous is not None and previous.__qualname__ != cls.__qualname__:
                raise TypeError(
                    f"{cls.__name__} declares PEFT_TYPE={peft_type!r}, already {previous.__name__}'s"
                )
            _CONFIG_TYPES[peft_type] = cls

    def __post_init__(self) -> None:
        if self.task_type is not None:
            if self.task_type not in list(TaskType):
                raise ValueError(
                    f"Invalid task type: '{self.task_type}'. Must be one of the following task types: "
                    f"{', '.join(TaskType)}. (task_type={self.task_type!r})"
                )
            self.task_type = TaskType(self.task_type).value
        if self.peft_version is None:  # PEFT fills it when the config is created; a loaded one keeps its own
            self.peft_version = f"deltatune-{_version}"

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
        elif peft_type is not None and str(peft_type).upper() != getattr(cls, "PEFT_TYPE", None):
            raise ValueError(f"config says peft_type={peft_type!r} but {cls.__name__} was asked to load it")
        names = {f.name for f in dataclasses.fields(target) if f.init}
        unknown = sorted(set(data) - names - {"peft_type"})
        if unknown:
            logger.warning("ignoring unknown adapter config keys: %s", ", ".join(unknown))
        kwargs = {k: v for k, v in data.items() if k in names}
        try:
            return target(**kwargs)
        except TypeError as err:  # a value of the wrong type deep inside a dataclass
            raise ValueError(f"invalid adapter config: {err}") from err

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
        """
        try:
            path = resolve_file(pretrained_model_name_or_path, CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
        except FileNotFoundError as err:
            raise AdapterConfigNotFoundError(
                f"Can't find '{CONFIG_NAME}' at '{os.fspath(pretrained_model_name_or_path)}': {err}"
            ) from err
        return cls.from_dict(cls.from_json_file(path))

    # ---- helpers for subclasses -----------------------------------------------------------------
    @property
    def is_prompt_learning(self) -> bool:
        """Always False: deltatune has no prompt-learning methods (kept for API compatibility)."""
        return False


@dataclass
class AdapterConfig(PeftConfig):
    """Fields shared by every low-rank method (LoRA, LoHa, LoKr, AdaLoRA).

    Attributes:
        r: Rank of the decomposition (> 0).
        target_modules: Modules to adapt: a list of names (exact name or ``.name`` suffix), a regex string
            (full match), or ``"all-linear"``. Transformers 4.x names (``query``) also work on 5.x models.
        exclude_modules: Modules never adapted (same forms as ``target_modules``).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. ``["classifier"]``).
        layers_to_transform: Layer indices to adapt (int or list); applies to list ``target_modules``.
        layers_pattern: Name of the layer container used to find the layer index (``"layers"``).
        rank_pattern: Per-module rank overrides, ``{regex: r}``.
        alpha_pattern: Per-module alpha overrides, ``{regex: alpha}``.
    """

    r: int = 8
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, Any] | None = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    #: Name of the field that holds the scale numerator (``lora_alpha`` or ``alpha``).
    ALPHA_FIELD: ClassVar[str] = "alpha"
    #: Name of the field the CLI's ``--dropout`` sets (None: the method has no dropout).
    DROPOUT_FIELD: ClassVar[str | None] = None
    #: Whether ``rank_pattern`` maps modules to ranks (validated as positive ints); a method whose pattern
    #: holds something else (AdaLoRA's keep masks) sets False and validates it itself.
    RANK_PATTERN_IS_RANKS: ClassVar[bool] = True
    #: Command-line flags this method reads differently: ``{flag: (field, notice logged when used)}``.
    FLAG_ALIASES: ClassVar[dict[str, tuple[str, str]]] = {}
    #: ``target_modules`` used when none are given, per transformers ``model_type`` (PEFT's defaults).
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = {}
    #: The guide's settings for this method (``deltatune train``'s defaults; the user's flags override them).
    RECIPE_DEFAULTS: ClassVar[dict[str, Any]] = {"r": 16}
    PEFT_TYPE: ClassVar[str] = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.peft_type is not None and str(self.peft_type).upper() != self.PEFT_TYPE:
            raise ValueError(
                f"peft_type={self.peft_type!r} does not match {type(self).__name__} ({self.PEFT_TYPE})"
            )
        self.peft_type = PeftTypeName(self.PEFT_TYPE)  # canonical spelling ("lora" → "LORA"), with .value
        check_positive_int("r", self.r)
        alpha = getattr(self, self.ALPHA_FIELD)
        check_range(self.ALPHA_FIELD, alpha, 0)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, list | tuple | set | frozenset):
                if not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{name} must be a string or a list of strings, got {value!r}")
                setattr(self, name, set(value))
            elif value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string or a list of strings, got {value!r}")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            if not all(isinstance(v, str) for v in self.modules_to_save):
                raise ValueError(
                    f"modules_to_save must be a list of module names, got {self.modules_to_save!r}"
                )
            self.modules_to_save = list(self.modules_to_save)
        if self.layers_to_transform is not None:
            if isinstance(self.target_modules, str):
                raise ValueError("layers_to_transform cannot be used when target_modules is a regex string")
            layers = (
                [self.layers_to_transform]
                if isinstance(self.layers_to_transform, int)
                else self.layers_to_transform
            )
            if not isinstance(layers, list | tuple) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers
            ):
                raise ValueError(
                    f"layers_to_transform must be an int or a list of ints, got {self.layers_to_transform!r}"
                )
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("layers_pattern only makes sense together with layers_to_transform")
        for pname in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, pname)
            if pattern is not None and not isinstance(pattern, dict):
                raise ValueError(f"{pname} must be a dict of {{module regex: value}}, got {pattern!r}")
        for key, value in (self.alpha_pattern or {}).items():
            check_range(f"alpha_pattern[{key!r}]", value, 0)
        if isinstance(self.rank_pattern, dict) and self.RANK_PATTERN_IS_RANKS:
            for key, value in self.rank_pattern.items():
                check_positive_int(f"rank_pattern[{key!r}]", value)

    def rank_and_alpha(self, module_names: list[str]) -> tuple[int, float]:
        """Rank and alpha for a module (any of its ``module_names`` spellings), after the patterns."""
        r = pattern_value(self.rank_pattern, module_names)
        alpha = pattern_value(self.alpha_pattern, module_names)
        return (self.r if r is None else int(r)), (self.alpha_value if alpha is None else float(alpha))

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
        """The config values that size the adapter's tensors (``r`` and the ``rank_pattern`` ranks), by field
        name. Loading checks each against the dimensions in the weights file before allocating anything, so a
        hostile ``"r": 4000000`` fails at once. A method whose tensors are not sized by one of these (or by
        others) overrides it."""
        ranks = {"r": int(self.r)}
        if self.RANK_PATTERN_IS_RANKS and isinstance(self.rank_pattern, dict):
            ranks.update({f"rank_pattern[{k!r}]": int(v) for k, v in self.rank_pattern.items()})
        return ranks

    def check_fits_run(self, planned_steps: int) -> None:
        """Raises ``ValueError`` when this config cannot work for a run of ``planned_steps`` optimiser steps
        (checked before any training; default: always fits)."""

    @property
    def alpha_value(self) -> float:
        """The scale numerator (``lora_alpha`` for LoRA/AdaLoRA, ``alpha`` for LoHa/LoKr)."""
        return float(getattr(self, self.ALPHA_FIELD))
