"""Which modules an adapter config targets: PEFT's matching rules as pure functions (no model changes).

Rules (PEFT's ``check_target_module_exists``):

1. ``exclude_modules`` first: a string is a regex full match, a list an exact name or ``.entry`` suffix;
2. modules named by ``modules_to_save`` (and their children) are never targets;
3. a string ``target_modules`` is a regex full match on the module name; a list matches a name exactly or
   as a ``.entry`` suffix; ``"all-linear"`` takes every linear layer except the output head;
4. ``layers_to_transform`` keeps only modules whose layer index (the first numbered segment, or the one
   after ``layers_pattern``) is listed.

Every rule is tried on each spelling of a module's name (its current name and its transformers 4.x name,
see :mod:`deltatune.names`), so ``["query", "value"]`` finds ``q_proj``/``v_proj`` on transformers 5.
:func:`check_target_module_exists` asks the same question of one name alone, and
:func:`find_minimal_target_modules` condenses a long list of names into the few suffixes that pick them out.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Callable, Collection, Sequence
from typing import Any

import regex

from . import _regex

__all__ = [
    "ALL_LINEAR",
    "SEQ_CLS_HEADS",
    "TASK_HEADS",
    "check_target_module_exists",
    "closest_names",
    "find_minimal_target_modules",
    "is_excluded",
    "layer_index",
    "layers_note",
    "match_list_entry",
    "match_target",
    "matching_entry",
    "modules_to_save_entries",
    "safe_fullmatch",
    "task_heads",
]

ALL_LINEAR = "all-linear"
#: Heads PEFT adds to ``modules_to_save`` for ``task_type="SEQ_CLS"``.
SEQ_CLS_HEADS = ("classifier", "score")
#: ``task_type`` → the heads PEFT's task class adds to ``modules_to_save`` (each may be absent from a model).
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": SEQ_CLS_HEADS,
    "TOKEN_CLS": SEQ_CLS_HEADS,
    "QUESTION_ANS": ("qa_outputs",),
}


def task_heads(config: Any) -> tuple[str, ...]:
    """The heads PEFT adds to ``modules_to_save`` for ``config.task_type`` (none for other tasks)."""
    task_type = getattr(config, "task_type", None)
    return TASK_HEADS.get(str(getattr(task_type, "value", task_type)), ())


def match_list_entry(name: str, entry: str) -> bool:
    """PEFT list semantics: ``name`` is ``entry`` or ends with ``.entry``."""
    return name == entry or name.endswith("." + entry)


def safe_fullmatch(pattern: str, name: str, what: str = "target_modules") -> bool:
    """``re.fullmatch(pattern, name)`` under a time limit; an invalid or catastrophically slow regex is
    reported as ``ValueError`` naming it (see :mod:`deltatune._regex`)."""
    return _regex.fullmatch(pattern, name, what) is not None


def closest_names(wanted: str, names: Sequence[str], n: int = 5) -> list[str]:
    """Module names (full or last component) closest to ``wanted``, for error messages."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names if name})
    pool = leaves + [name for name in names if name]
    return list(dict.fromkeys(difflib.get_close_matches(wanted, pool, n=n, cutoff=0.4)))


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The layer index in a module name: the first numbered segment, or the one after ``layers_pattern``."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) and layers_pattern else layers_pattern
    if not patterns:  # None, "" or []: PEFT's default (any numbered segment after the first component)
        m = re.match(r".*?\.[^.]*\.(\d+)\.", name)
        return int(m.group(1)) if m else None
    for pattern in patterns:
        m = _regex.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name, "layers_pattern")
        if m:
            return int(m.group(1))
    return None


def modules_to_save_entries(config: Any) -> list[str]:
    """``config.modules_to_save`` plus the heads PEFT's task class adds (:data:`TASK_HEADS`: ``classifier`` and
    ``score`` for ``SEQ_CLS`` and ``TOKEN_CLS``, ``qa_outputs`` for ``QUESTION_ANS``)."""
    entries = list(getattr(config, "modules_to_save", None) or [])
    entries += [e for e in task_heads(config) if e not in entries]
    return entries


def is_excluded(config: Any, variants: Sequence[str]) -> bool:
    """Whether ``exclude_modules`` or ``modules_to_save`` rules out the module named ``variants`` (rules 1, 2)."""
    exclude = getattr(config, "exclude_modules", None)
    if exclude:
        if isinstance(exclude, str):
            if any(safe_fullmatch(exclude, v, "exclude_modules") for v in variants):
                return True
        elif any(match_list_entry(v, e) for v in variants for e in exclude):
            return True
    for entry in modules_to_save_entries(config):
        if any(re.match(rf"(^|.*\.){re.escape(entry)}($|\..*)", v) for v in variants):
            return True
    return False


def match_target(
    config: Any,
    variants: Sequence[str],
    is_linear: bool,
    is_output_head: Callable[[], bool],
) -> str | None:
    """The spelling of a module's name through which ``config`` targets it, or None when it is no target.

    Args:
        config: The adapter config (``target_modules``, ``exclude_modules``, ``modules_to_save``,
            ``layers_to_transform``, ``layers_pattern``).
        variants: The module's names: its current name first, then other spellings.
        is_linear: Whether the module is a linear layer (for ``"all-linear"``).
        is_output_head: Called only for ``"all-linear"``: whether the module is the model's output head.
    """
    if is_excluded(config, variants):
        return None
    targets = config.target_modules
    hit: str | None = None
    if targets == ALL_LINEAR:
        if is_linear and not is_output_head():
            hit = variants[0]
    elif isinstance(targets, str):
        return next((v for v in variants if safe_fullmatch(targets, v)), None)
    elif targets:
        hit = next((v for v in variants for e in targets if match_list_entry(v, e)), None)
    if hit is None or getattr(config, "layers_to_transform", None) is None:
        return hit
    layers = config.layers_to_transform
    wanted = [layers] if isinstance(layers, int) else list(layers)
    index = _target_layer(config, hit, variants)
    return hit if index is not None and index in wanted else None


def _target_layer(config: Any, hit: str, variants: Sequence[str]) -> int | None:
    """The layer index of a target matched as ``hit`` (``layers_pattern``'s rule; else from its other names)."""
    pattern = getattr(config, "layers_pattern", None)
    index = layer_index(hit, pattern)
    if index is None:
        index = next((i for v in variants if (i := layer_index(v, pattern)) is not None), None)
    return index


def layers_note(config: Any, variants_of: Sequence[Sequence[str]]) -> tuple[str, bool]:
    """For an error where ``config`` targets nothing: PEFT's note on ``layers_to_transform`` and
    ``layers_pattern`` ("" without them), and whether ``target_modules`` does name modules of the model (each
    module given by its name variants), so that ``layers_to_transform`` is the cause; the note then says which
    layer indices those modules have."""
    layers = getattr(config, "layers_to_transform", None)
    if layers is None:
        return "", False
    pattern = getattr(config, "layers_pattern", None)
    note = f" Note: You specified 'layers_to_transform': {layers}."
    if pattern is not None:
        note += f" You also specified 'layers_pattern': {pattern}."
    anywhere = copy.copy(config)
    anywhere.__dict__["layers_to_transform"] = None
    hits = [(h, v) for v in variants_of if (h := match_target(anywhere, v, True, lambda: False)) is not None]
    if not hits:
        return note, False
    indices = sorted({i for h, v in hits if (i := _target_layer(config, h, v)) is not None})
    where = f"after layers_pattern {pattern!r}" if pattern else "(the first numbered name component)"
    found = f"their layer indices are {indices}" if indices else f"none has a layer index {where}"
    note += (
        f" target_modules={config.target_modules!r} matches {len(hits)} modules, but layers_to_transform="
        f"{layers} selects none of them: {found}."
    )
    return note, True


def matching_entry(config: Any, hit: str) -> str | None:
    """The ``target_modules`` list entry that matched the spelling ``hit`` (None for regex/all-linear)."""
    targets = config.target_modules
    if isinstance(targets, str) or not targets:
        return None
    return next((e for e in targets if match_list_entry(hit, e)), None)


def check_target_module_exists(config: Any, key: str) -> bool | regex.Match[str] | None:
    """Whether ``config`` targets the module named ``key``, judged from the name alone (rules 1-4 above).

    Args:
        config: An adapter config (``target_modules``, ``exclude_modules``, ``modules_to_save``,
            ``layers_to_transform``, ``layers_pattern``).
        key: A module's full name in the model, e.g. ``"model.layers.0.self_attn.q_proj"``.

    Returns:
        For a regex ``target_modules``, the match object (truthy) or None; otherwise True or False. False
        also when ``exclude_modules`` or ``modules_to_save`` rules the name out, when ``target_modules`` is
        None, and for ``"all-linear"``, which selects by layer type, something a name cannot tell.

    Raises:
        ValueError: for an invalid or catastrophically slow regex (see :func:`safe_fullmatch`).
    """
    if is_excluded(config, [key]):
        return False
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str) and targets != ALL_LINEAR:
        return _regex.fullmatch(targets, key, "target_modules")
    return match_target(config, [key], is_linear=False, is_output_head=lambda: False) is not None


def _dotted_suffixes(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["c", "b.c", "a.b.c"]``: the name's whole-component endings, shortest first."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]


def find_minimal_target_modules(
    target_modules: Collection[str], other_module_names: Collection[str]
) -> set[str]:
    """The fewest, shortest ``target_modules`` list entries that select exactly ``target_modules`` among
    ``target_modules`` and ``other_module_names``.

    Each target name contributes its shortest ending of whole dot-separated components that ends no other
    module's name (``"layers.3.self_attn.q_proj"`` -> ``"q_proj"`` when no other name ends in ``q_proj``);
    equal endings count once. A target whose every ending (itself included) also ends another name is kept
    whole: a list entry cannot tell them apart, just as the full list could not. Useful to shrink a config
    that lists hundreds of full module names (as converted diffusers adapters do) before matching or saving.

    Args:
        target_modules: Full names of the modules to select (a list or set, not one string).
        other_module_names: Names of every other module of the model; none may be a target.

    Returns:
        The entries; with list semantics (exact name or ``.entry`` suffix) they match every target and
        nothing in ``other_module_names``.

    Raises:
        ValueError: if ``target_modules`` is a string, empty or holds an empty name, or if a name is in both.
    """
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(
            f"target_modules should be a list or set of strings, got {target_modules!r}; give the full names "
            "of the modules to select"
        )
    targets = set(target_modules)
    if "" in targets:
        raise ValueError("target_modules should not contain an empty string: every entry must name a module")
    others = set(other_module_names)
    common = sorted(targets & others)
    if common:
        raise ValueError(
            f"target_modules and other_module_names contain common elements ({', '.join(common[:5])}); a module "
            "is either a target or not, so the two collections must be disjoint"
        )
    taken = {suffix for name in others for suffix in _dotted_suffixes(name)}
    return {next((s for s in _dotted_suffixes(name) if s not in taken), name) for name in targets}
