"""The initialiser and optimiser options of ``train``/``compare``: ``--init_lora_weights`` (and any adapter field
whose config declares ``FLAG_CHOICES``) with the values the library accepts, and LoRA+ (``--loraplus_lr_ratio``,
``--loraplus_lr_embedding``) for the methods whose config lists them in ``OPTIMIZER_OPTIONS``.

Everything is read from the config classes through the registry, torch-free: a value is offered when the
method's config class can be built with it (with the recipe's defaults), so an initialiser the library gains
(EVA and CorDA, computed from data) is offered without an edit here; until then it is listed as coming and
refused in one line. In ``compare`` these options take several values, one run per value (see
:func:`compare_variants`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import re
import warnings
from dataclasses import field
from typing import Any

from .run_parser import CommandError

__all__ = [
    "OptimizerOptions",
    "accepted_values",
    "check_run_options",
    "choice_fields",
    "coming_values",
    "compare_variants",
    "optimizer_kwargs",
    "optimizer_methods",
    "refine_flags",
    "variant_dests",
]

_NUMBERED = re.compile(r"^(?P<head>.+)_N$")


@dataclasses.dataclass
class OptimizerOptions:
    """The optimiser options of ``train`` and ``compare`` (LoRA+, Hayou et al., 2024)."""

    loraplus_lr_ratio: float | None = field(
        default=None,
        metadata={
            "help": "loraplus optimiser: train the B factors at this multiple of --learning_rate (the paper: "
            "2 to 16; unset: one learning rate)",
            "metavar": "X",
        },
    )
    loraplus_lr_embedding: float | None = field(
        default=None,
        metadata={
            "help": "loraplus optimiser: the learning rate of adapted embeddings' factors (default 1e-6, as in "
            "PEFT)",
            "metavar": "LR",
        },
    )


OPTIMIZER_DESTS = tuple(f.name for f in dataclasses.fields(OptimizerOptions))


def _configs() -> dict[str, Any]:
    from ..registry import available_methods, get_method

    return {name: get_method(name).config_cls for name in available_methods()}


def choice_fields() -> dict[str, tuple[str, ...]]:
    """Field → the values some config class offers for it (``FLAG_CHOICES``, in declaration order)."""
    fields: dict[str, tuple[str, ...]] = {}
    for cls in _configs().values():
        for name, values in getattr(cls, "FLAG_CHOICES", {}).items():
            fields[name] = tuple(dict.fromkeys((*fields.get(name, ()), *values)))
    return fields


def _value(text: str) -> Any:
    lowered = text.strip().lower()
    return {"true": True, "false": False}.get(lowered, text.strip())


def _probe(offered: str) -> Any:
    match = _NUMBERED.match(offered)
    return f"{match['head']}_4" if match else _value(offered)


@functools.cache
def accepted_values(method: str, name: str) -> tuple[str, ...]:
    """The values of ``FLAG_CHOICES[name]`` that ``method``'s config class can be built with (with the recipe's
    defaults for that value); ``pissa_niter_N`` stands for every ``pissa_niter_<number>``."""
    cls = _configs()[method]
    out = []
    for offered in getattr(cls, "FLAG_CHOICES", {}).get(name, ()):
        given = {name: _probe(offered)}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cls(**{**cls.recipe_defaults(0, given), **given})
        except (ValueError, TypeError):
            continue
        out.append(offered)
    return tuple(out)


def refused_values(name: str) -> dict[str, str]:
    """Values the library accepts for ``name`` that the command line refuses → why (``FLAG_REFUSED``)."""
    out: dict[str, str] = {}
    for cls in _configs().values():
        out.update(getattr(cls, "FLAG_REFUSED", {}).get(name, {}))
    return out


def coming_values(name: str) -> tuple[str, ...]:
    """Values offered for ``name`` that no registered method accepts yet."""
    accepted = {v for method in _configs() for v in accepted_values(method, name)}
    return tuple(v for v in choice_fields().get(name, ()) if v not in accepted)


def _matches(text: str, offered: str) -> bool:
    match = _NUMBERED.match(offered)
    if match:
        head, _, tail = text.partition(f"{match['head']}_")
        return not head and tail.isdigit()
    return str(_value(text)).lower() == offered.lower()


def _known(name: str, text: str, values: tuple[str, ...]) -> str | None:
    return next((v for v in values if _matches(text, v)), None)


def _choice_type(name: str) -> Any:
    """The argparse ``type`` of ``--<name>``: a value some method accepts, else one line with the choices."""
    offered = choice_fields()[name]

    def parse(text: str) -> Any:
        refused = refused_values(name)
        blocked = _known(name, text, tuple(refused))
        if blocked is not None:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not offered on the command line: {refused[blocked]}. Use it from the library and "
                "save with save_pretrained(..., path_initial_model_for_weight_conversion=...); choose from "
                + ", ".join(v for v in offered if v not in coming_values(name))
            )
        coming = coming_values(name)
        value = _known(name, text, offered)
        valid = ", ".join(v for v in offered if v not in coming)
        if value is None:
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r}; choose from {valid}")
        if value in coming:
            raise argparse.ArgumentTypeError(
                f"{text!r} is coming (an initialiser computed from the training data): this version's library "
                f"does not have it yet; choose from {valid}"
            )
        return _value(text)

    parse.__name__ = "choice"
    return parse


def refine_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """Gives the ``FLAG_CHOICES`` fields their choices (metavar, type, the coming ones in the help) and the
    optimiser options the methods they apply to; in ``compare`` these take several values."""
    texts = getattr(parser, "adapter_texts", {})
    scope = ", ".join(optimizer_methods())
    for action in parser._actions:
        if action.dest in choice_fields():
            coming = coming_values(action.dest)
            action.type = _choice_type(action.dest)
            action.metavar = "{" + ",".join(v for v in choice_fields()[action.dest] if v not in coming) + "}"
            if coming:
                note = f" Coming (computed from training data): {', '.join(coming)}."
                action.help = (action.help or "") + note
                if action.dest in texts:
                    texts[action.dest] += note
        elif action.dest in OPTIMIZER_DESTS:
            action.help = f"{action.help} [{scope}]"
        else:
            continue
        if command == "compare" and action.dest != "loraplus_lr_embedding":
            action.nargs = "+"


def variant_dests() -> tuple[str, ...]:
    """The options that take several values in ``compare`` (one run per value)."""
    return (*choice_fields(), "loraplus_lr_ratio", "loraplus_lr_embedding")


def optimizer_methods() -> list[str]:
    """The methods the optimiser options apply to (their config's ``OPTIMIZER_OPTIONS``)."""
    return [
        m
        for m, cls in _configs().items()
        if set(OPTIMIZER_DESTS) <= set(getattr(cls, "OPTIMIZER_OPTIONS", ()))
    ]


def optimizer_kwargs(options: argparse.Namespace) -> dict[str, Any]:
    """The optimiser options given (unset ones left out)."""
    return {d: getattr(options, d) for d in OPTIMIZER_DESTS if getattr(options, d, None) is not None}


def check_run_options(method: str, adapter_kwargs: dict[str, Any], optimizer: dict[str, Any]) -> None:
    """Refuses, in one line, a ``FLAG_CHOICES`` value ``method`` does not accept and optimiser options for a
    method they do not apply to (or ``--loraplus_lr_embedding`` without ``--loraplus_lr_ratio``).

    Raises:
        CommandError: naming the option, the value and what is valid.
    """
    for name, value in adapter_kwargs.items():
        if name not in choice_fields():
            continue
        accepted = accepted_values(method, name)
        if _known(name, str(value), accepted) is None:
            text = str(value).lower() if isinstance(value, bool) else value
            others = [m for m in _configs() if _known(name, str(value), accepted_values(m, name))]
            where = f"; {text} applies to {', '.join(others)}" if others else ""
            raise CommandError(
                f"--{name} {text} is not available for {method}: it takes {', '.join(accepted)}{where}"
            )
    if not optimizer:
        return
    methods = optimizer_methods()
    if method not in methods:
        raise CommandError(f"--{next(iter(optimizer))} applies to {', '.join(methods)}, not to {method}")
    if "loraplus_lr_ratio" not in optimizer:
        raise CommandError(
            "--loraplus_lr_embedding needs --loraplus_lr_ratio (which turns the loraplus optimiser on)"
        )
    ratio = optimizer["loraplus_lr_ratio"]
    if not ratio > 0:
        raise CommandError(f"--loraplus_lr_ratio must be positive (the paper uses 2 to 16), got {ratio}")


def compare_variants(
    method: str, options: argparse.Namespace
) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """``compare``'s runs of ``method``: (label, adapter kwargs, optimiser kwargs) for each combination of the
    several values given to the ``FLAG_CHOICES`` fields and ``--loraplus_lr_ratio``; the values ``method``
    does not take are left out (a field it does not have: one plain run)."""
    axes: list[list[tuple[str, str, Any]]] = []
    for name in choice_fields():
        values = getattr(options, name, None)
        if values is None or not accepted_values(method, name):
            continue
        kept = [v for v in values if _known(name, str(v), accepted_values(method, name))]
        axes.append([("adapter", name, v) for v in kept])
    ratios = getattr(options, "loraplus_lr_ratio", None)
    if ratios is not None and method in optimizer_methods():
        axes.append([("optimizer", "loraplus_lr_ratio", r) for r in ratios])
    runs = []
    for combo in itertools.product(*axes):
        adapter = {name: v for kind, name, v in combo if kind == "adapter"}
        optimizer = {name: v for kind, name, v in combo if kind == "optimizer"}
        if optimizer and getattr(options, "loraplus_lr_embedding", None) is not None:
            optimizer["loraplus_lr_embedding"] = options.loraplus_lr_embedding
        label = " ".join(f"{_short(name)}={_shown(v)}" for _, name, v in combo)
        runs.append((label, adapter, optimizer))
    return runs


def _short(name: str) -> str:
    return "init" if name.startswith("init_") else "loraplus" if name == "loraplus_lr_ratio" else name


def _shown(value: Any) -> str:
    return (
        str(value).lower()
        if isinstance(value, bool)
        else f"{value:g}"
        if isinstance(value, float)
        else str(value)
    )
