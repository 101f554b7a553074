"""Words in rapm's messages: a count with its noun in the right number ("1 grid", "2 grids")."""

from __future__ import annotations


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``count`` and ``noun``, the noun in the plural (``many``, else ``noun + "s"``) unless ``count`` is 1."""
    return f"{count} {noun if count == 1 else many or noun + 's'}"
