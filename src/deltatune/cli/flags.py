"""Command-line flags generated from the config dataclasses of the registered methods.

Every config field with a type a command line can express becomes ``--<field>``; its help is the field's
``metadata["help"]`` (written once, in the config dataclass) and lists the methods that have it. Three
short aliases follow the guide's wording: ``--alpha`` (``lora_alpha`` or ``alpha``), ``--dropout``
(``lora_dropout`` or ``module_dropout``) and, for AdaLoRA, ``--r`` (its average target rank ``target_r``).
Only the config classes are read (through the registry), so building these flags imports no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import re
import typing
from dataclasses import dataclass
from typing import Any

from ..registry import available_methods, get_method

logger = logging.getLogger(__name__)

__all__ = [
    "AdapterFlag",
    "adapter_flags",
    "adapter_kwargs_for",
    "add_adapter_flags",
    "closest_flags",
    "field_help",
]

#: Config fields that are bookkeeping, set from other flags, or need Python objects.
SKIPPED_FIELDS = frozenset(
    {
        "peft_type",
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "auto_mapping",
        "peft_version",
    }
)
ALIASES = {"alpha": "scale numerator", "dropout": "dropout"}


@dataclass
class AdapterFlag:
    """One generated flag: the field name, its type hint, the methods that have it and its help."""

    name: str
    hint: Any
    methods: list[str]
    help: str


def field_help(field: dataclasses.Field[Any]) -> str:
    """The help text of a config field: its ``metadata["help"]`` (empty when it has none)."""
    return str(field.metadata.get("help", ""))


def _kind(hint: Any) -> str | None:
    """Classifies a type hint into a flag kind, or None when a command line cannot express it."""
    text = str(hint).replace("typing.", "")
    if hint is Any or text == "Any":
        return None
    if hint is bool:
        return "bool"
    if hint is int:
        return "int"
    if hint is float:
        return "float"
    if text.startswith("dict") or "dict[" in text:
        return "json"
    if "list[int]" in text:
        return "int_list"
    if "list[str]" in text:
        return "str_list"
    if "bool" in text and "str" in text:
        return "bool_or_str"
    if "int" in text and "None" in text and "str" not in text:
        return "int"
    if "str" in text:
        return "str"
    return None


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _bool_or_str(text: str) -> bool | str:
    try:
        return _bool(text)
    except argparse.ArgumentTypeError:
        return text


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(
            f"expected JSON such as '{{\"query\": 8}}', got {text!r} ({err})"
        ) from err


def adapter_flags() -> dict[str, AdapterFlag]:
    """Field name → flag, over the config classes of every registered method."""
    flags: dict[str, AdapterFlag] = {}
    for method in available_methods():
        cls = get_method(method).config_cls
        hints = typing.get_type_hints(cls)
        inert = getattr(cls, "INERT_FIELDS", {})  # fields the method ignores: not its flags
        for f in dataclasses.fields(cls):
            if f.name in SKIPPED_FIELDS or f.name in inert or not f.init or _kind(hints[f.name]) is None:
                continue
            if f.name in flags:
                flags[f.name].methods.append(method)
                continue
            flags[f.name] = AdapterFlag(f.name, hints[f.name], [method], field_help(f))
    return flags


def add_adapter_flags(parser: argparse.ArgumentParser) -> None:
    """Adds ``--<field>`` for every adapter config field, plus ``--alpha`` and ``--dropout``."""
    group = parser.add_argument_group(
        "adapter options (generated from the config classes; each applies to the methods listed)"
    )
    all_methods = set(available_methods())
    for flag in adapter_flags().values():
        if flag.name in ALIASES:
            continue  # added below as an alias that fits every method
        kind = _kind(flag.hint)
        scope = "" if set(flag.methods) == all_methods else f" [{', '.join(flag.methods)}]"
        help_text = (flag.help or flag.name).replace("%", "%%") + scope
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
        if kind == "bool":
            kwargs.update(type=_bool, nargs="?", const=True, metavar="BOOL")
        elif kind in ("int", "float"):
            kwargs.update(type=int if kind == "int" else float)
        elif kind == "json":
            kwargs.update(type=_json, metavar="JSON")
        elif kind == "int_list":
            kwargs.update(type=int, nargs="+")
        elif kind == "str_list":
            kwargs.update(nargs="*" if flag.name == "modules_to_save" else "+")
        elif kind == "bool_or_str":
            kwargs.update(type=_bool_or_str)
        names = [f"--{flag.name}"]
        if flag.name == "r":  # torchrun rejects --r after the script as ambiguous with its own --r* options
            names.append("--rank")
        group.add_argument(*names, **kwargs)
    alpha_fields: dict[str, list[str]] = {}
    by_field: dict[str, list[str]] = {}
    for method in available_methods():
        config_cls = get_method(method).config_cls
        if config_cls.ALPHA_FIELD:
            alpha_fields.setdefault(config_cls.ALPHA_FIELD, []).append(method)
        if config_cls.DROPOUT_FIELD:
            by_field.setdefault(config_cls.DROPOUT_FIELD, []).append(method)
    group.add_argument(
        "--alpha",
        type=float,
        default=argparse.SUPPRESS,
        help="scale numerator: " + " or ".join(f"{f} ({', '.join(m)})" for f, m in alpha_fields.items()),
    )
    group.add_argument(
        "--dropout",
        type=float,
        default=argparse.SUPPRESS,
        help="dropout: " + " or ".join(f"{f} ({', '.join(m)})" for f, m in by_field.items()),
    )


def _normalise_targets(value: Any) -> Any:
    # One entry that is "all-linear" or looks like a regex is PEFT's string form; otherwise a list of names.
    if (
        isinstance(value, list)
        and len(value) == 1
        and (value[0] == "all-linear" or re.search(r"[\\*+?|()\[\]^$]", value[0]))
    ):
        return value[0]
    return value


def adapter_kwargs_for(method: str, namespace: argparse.Namespace, strict: bool = True) -> dict[str, Any]:
    """The config keyword arguments the user gave for ``method`` (aliases resolved).

    Args:
        method: The method name.
        namespace: Parsed arguments (absent attributes were not given).
        strict: Raise for flags the method does not have (``compare`` passes False and skips them).

    Raises:
        ValueError: for a flag that belongs to other methods only, naming them and this method's options.
    """
    spec = get_method(method)
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    given = {
        name: getattr(namespace, name)
        for name in adapter_flags()
        if name not in ALIASES and hasattr(namespace, name)
    }
    out: dict[str, Any] = {}
    inert = getattr(spec.config_cls, "INERT_FIELDS", {})
    for name, value in given.items():
        if name in inert:
            if not strict:
                continue
            raise ValueError(
                f"--{name} does not apply to {method}: {inert[name]}; it applies to "
                + ", ".join(adapter_flags()[name].methods)
            )
        alias = spec.config_cls.FLAG_ALIASES.get(name)
        if alias is not None and not hasattr(namespace, alias[0]):
            logger.warning("%s (--%s %s)", alias[1], name, value)
            out[alias[0]] = value
            continue
        if name not in fields:
            if not strict:
                continue
            owners = adapter_flags()[name].methods
            options = sorted(n for n in adapter_flags() if n in fields)
            raise ValueError(
                f"--{name} is an option of {', '.join(owners)}, not of {method}; {method} options: "
                + ", ".join(f"--{o}" for o in options)
            )
        out[name] = value
    for flag, field, lacks in (
        ("alpha", spec.config_cls.ALPHA_FIELD, "scale numerator"),
        ("dropout", spec.config_cls.DROPOUT_FIELD, "dropout field"),
    ):
        if not hasattr(namespace, flag):
            continue
        if field is not None:
            value = getattr(namespace, flag)
            if field in out and out[field] != value:
                raise ValueError(
                    f"--{flag} {value} and --{field} {out[field]} name the same option with different values; "
                    "pass one of them"
                )
            out[field] = value
        elif strict:
            raise ValueError(f"--{flag}: {method} has no {lacks}")
    for name in ("exclude_modules", "layers_pattern", *spec.config_cls.MODULE_LIST_FIELDS):
        if name in out:
            out[name] = _normalise_targets(out[name])
    return out


def closest_flags(unknown: str, known: list[str], n: int = 3) -> list[str]:
    """The ``n`` known option strings closest to ``unknown``."""
    return difflib.get_close_matches(unknown.split("=", 1)[0], known, n=n, cutoff=0.6)
