"""Regular expressions from configs, matched with a time limit.

An adapter config may carry regular expressions (``target_modules`` as a string, ``exclude_modules``,
``layers_pattern``, the keys of ``rank_pattern``/``alpha_pattern``). A folder from someone else can make
one that backtracks for ever on a module name (``"(.|.)*X"``); Python's ``re`` cannot be interrupted. These
helpers match with the ``regex`` package (the engine transformers uses; ``re``'s syntax) under a timeout,
and report a bad or too-slow pattern as a ``ValueError`` naming it.
"""

from __future__ import annotations

import regex

__all__ = ["MATCH_TIMEOUT_S", "fullmatch", "match"]

#: Longest time one pattern may take on one name (real patterns take microseconds).
MATCH_TIMEOUT_S = 0.5


def _run(kind: str, pattern: str, text: str, what: str) -> regex.Match[str] | None:
    try:
        compiled = regex.compile(pattern)
    except (regex.error, TypeError, RecursionError, OverflowError) as err:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {err}") from err
    try:
        return getattr(compiled, kind)(text, timeout=MATCH_TIMEOUT_S)  # type: ignore[no-any-return]
    except TimeoutError as err:
        raise ValueError(
            f"{what} {pattern!r} took more than {MATCH_TIMEOUT_S} s to match the name {text!r} (catastrophic "
            "backtracking); use a simpler pattern or a list of module names"
        ) from err


def fullmatch(pattern: str, text: str, what: str = "the pattern") -> regex.Match[str] | None:
    """``re.fullmatch(pattern, text)`` under a time limit.

    Raises:
        ValueError: for an invalid pattern or one that takes longer than :data:`MATCH_TIMEOUT_S`, naming it
            as ``what`` (e.g. ``"target_modules"``).
    """
    return _run("fullmatch", pattern, text, what)


def match(pattern: str, text: str, what: str = "the pattern") -> regex.Match[str] | None:
    """``re.match(pattern, text)`` under a time limit (see :func:`fullmatch`)."""
    return _run("match", pattern, text, what)
