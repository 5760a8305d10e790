"""Output for people: the rich console the commands print to."""

from __future__ import annotations

from typing import Any

__all__ = ["console"]


def console() -> Any:
    """A rich console for people-facing output."""
    from rich.console import Console

    return Console()
