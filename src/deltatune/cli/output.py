"""Output for people: the rich console the commands print to, and :func:`esc` for everything user-supplied."""

from __future__ import annotations

from typing import Any

from .errors import printable

__all__ = ["console", "esc"]


def console() -> Any:
    """A rich console for people-facing output."""
    from rich.console import Console

    return Console()


def esc(value: Any) -> str:
    """``value`` safe to embed in rich markup: control characters (ESC sequences, BEL ...) shown as visible
    escapes and ``[`` escaped, so a label, path or folder name prints as written and never as markup or
    terminal commands."""
    from rich.markup import escape

    return escape(printable(value))
