"""PEFT's names for the method types, read from the method registry at each use (a method registered later is
there too): ``PeftType`` (``PeftType.LORA``, ``PeftType("LOHA")``, ``"IA3" in PeftType``, iteration),
``PEFT_TYPE_TO_CONFIG_MAPPING`` (type → config class) and ``get_peft_config`` (a config from a dict).

``PeftType``'s members are :class:`~deltatune.config.PeftTypeName` strings, the values configs carry in
``peft_type``: they compare equal to ``"LORA"`` and answer ``.value``, as PEFT's string-Enum members do.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from ._config_types import PeftTypeName
from .config import PeftConfig, config_class_for, known_peft_types

__all__ = ["PEFT_TYPE_TO_CONFIG_MAPPING", "PeftType", "get_peft_config"]


def _known() -> str:
    return ", ".join(known_peft_types())


class _PeftTypeMeta(type):
    """Class-level attribute access, membership, iteration and length of :class:`PeftType`."""

    def __getattr__(cls, name: str) -> PeftTypeName:
        if name in known_peft_types():
            return PeftTypeName(name)
        raise AttributeError(f"PeftType has no member {name!r}; deltatune supports: {_known()}")

    def __iter__(cls) -> Iterator[PeftTypeName]:
        return iter([PeftTypeName(name) for name in known_peft_types()])

    def __contains__(cls, value: object) -> bool:
        return isinstance(value, str) and str.__str__(value).upper() in known_peft_types()

    def __len__(cls) -> int:
        return len(known_peft_types())


class PeftType(metaclass=_PeftTypeMeta):
    """The ``peft_type`` of every registered method (PEFT's ``PeftType``): ``PeftType.LORA == "LORA"``;
    ``PeftType("lora")`` is ``PeftType.LORA``. An unknown name raises, listing the supported ones."""

    def __new__(cls, value: object) -> PeftTypeName:  # type: ignore[misc]
        name = str.__str__(value).upper() if isinstance(value, str) else None
        if name is None or name not in known_peft_types():
            raise ValueError(f"{value!r} is not a valid PeftType; deltatune supports: {_known()}")
        return PeftTypeName(name)


class _ConfigsByPeftType(Mapping[str, type[PeftConfig]]):
    """``peft_type`` → config class, from the registry (PEFT's ``PEFT_TYPE_TO_CONFIG_MAPPING``)."""

    def __getitem__(self, key: str) -> type[PeftConfig]:
        if key not in PeftType:
            raise KeyError(f"{key!r}: not a peft_type deltatune supports ({_known()})")
        return config_class_for(key)

    def __iter__(self) -> Iterator[str]:
        return iter(PeftType)

    def __len__(self) -> int:
        return len(PeftType)

    def __repr__(self) -> str:
        return f"PEFT_TYPE_TO_CONFIG_MAPPING({ {k: v.__name__ for k, v in self.items()} })"


PEFT_TYPE_TO_CONFIG_MAPPING: Mapping[str, type[PeftConfig]] = _ConfigsByPeftType()


def get_peft_config(config_dict: Mapping[str, Any]) -> PeftConfig:
    """The config a dict describes (PEFT's ``get_peft_config``): its ``peft_type`` picks the class, as
    :meth:`PeftConfig.from_dict` does for ``adapter_config.json`` (unknown keys dropped with a warning).

    Raises:
        ValueError: when ``peft_type`` is missing or unknown (the supported ones listed), or a value is invalid.
    """
    return PeftConfig.from_dict(dict(config_dict))
