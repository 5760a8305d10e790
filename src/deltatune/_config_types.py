"""Building blocks of the adapter configs: PEFT's ``TaskType``, its warning and error types, and the
validation helpers every config uses (errors that name the field, the value and what is allowed)."""

from __future__ import annotations

import enum
from typing import Any

from . import _regex

__all__ = [
    "AdapterConfigNotFoundError",
    "MissingConfigKeysError",
    "NoMatchingPeftModuleError",
    "PeftError",
    "PeftTypeName",
    "PeftWarning",
    "TaskType",
    "check_choice",
    "check_names",
    "check_positive_int",
    "check_range",
    "name_source",
    "pattern_value",
]


class TaskType(str, enum.Enum):
    """The ``task_type`` values PEFT knows (a string Enum, as in PEFT: members compare equal to their names)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return str(self.value)


class PeftTypeName(str):
    """A ``peft_type`` string that also answers ``.value`` (PEFT's ``peft_type`` is a string Enum member)."""

    @property
    def value(self) -> str:
        """The type as a plain string (``"LORA"``)."""
        return str.__str__(self)


class PeftWarning(UserWarning):
    """Warnings about adapter settings that work but may not do what was meant (PEFT's ``PeftWarning``)."""


class PeftError(Exception):
    """Base of PEFT's own errors (PEFT's ``PeftError``)."""


class NoMatchingPeftModuleError(PeftError, ValueError):
    """An adapter's ``target_modules`` matched no module of the model (PEFT's ``NoMatchingPeftModuleError``): a
    ``ValueError`` too, so ``except ValueError`` still catches it, as in PEFT."""


class MissingConfigKeysError(TypeError, ValueError):
    """A JSON file read as an adapter config lacks ``peft_type``: it is no adapter config. A ``TypeError`` as in
    PEFT, and a ``ValueError`` as deltatune raised before."""


class AdapterConfigNotFoundError(FileNotFoundError, ValueError):
    """No ``adapter_config.json`` where one was asked for (``FileNotFoundError``; PEFT raises ``ValueError``)."""


def name_source(err: BaseException, path: str) -> None:
    """Appends `` (in path)`` to ``err``'s message in place (the file an invalid value came from), keeping its
    type and the text before it, which PEFT's users match."""
    where = f" (in {path})"
    if err.args and isinstance(err.args[0], str):
        err.args = (err.args[0] + where, *err.args[1:])
    else:
        err.add_note(where.strip())


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raises ``ValueError`` unless ``value`` is one of ``choices``, naming the field and the choices."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def check_range(
    name: str, value: Any, low: float | None = None, high: float | None = None, *, high_open: bool = True
) -> None:
    """Raises ``ValueError`` unless ``low <= value`` and ``value < high`` (``<=`` if not ``high_open``)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ValueError(f"{name}={value!r} must be a number")
    too_low = low is not None and value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        bound = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{')' if high_open else ']'}"
        raise ValueError(f"{name}={value!r} is out of range; it must lie in {bound}")


def check_names(name: str, value: Any) -> Any:
    """A list/set of strings as a set, a string as is, None as None; anything else raises ``ValueError``
    (the module-name fields: ``target_modules``, ``exclude_modules``, IA³'s ``feedforward_modules``)."""
    if isinstance(value, list | tuple | set | frozenset):
        if not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name} must be a string or a list of strings, got {value!r}")
        return set(value)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a string or a list of strings, got {value!r}")
    return value


def check_positive_int(name: str, value: Any, *, allow_zero: bool = False) -> None:
    """Raises ``ValueError`` unless ``value`` is an int > 0 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        need = "a non-negative integer" if allow_zero else "a positive integer"
        raise ValueError(f"{name}={value!r} must be {need}")


def pattern_value(pattern: dict[str, Any] | None, names: list[str]) -> Any:
    """First value of ``pattern`` whose key matches one of ``names`` as ``(.*\\.)?key$`` (PEFT's rule)."""
    for key, value in (pattern or {}).items():
        for name in names:
            if _regex.match(rf"(.*\.)?({key})$", name, "a rank_pattern/alpha_pattern key"):
                return value
    return None
