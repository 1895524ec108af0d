"""Marked blocks of a Markdown page (specs/cli.md) that are generated from the command itself.

The CLI reference and the examples each own one block between HTML comment markers;
regenerating a block replaces only the text between its markers.
"""

from __future__ import annotations


def embedded(readme: str, start: str, end: str) -> str | None:
    """Return the text between ``start`` and ``end`` in ``readme``, or None if absent."""
    first = readme.find(start)
    last = readme.find(end)
    if first < 0 or last < first:
        return None
    return readme[first + len(start) : last]


def replace_block(readme: str, block: str, start: str, end: str) -> str:
    """Return ``readme`` with the text between the markers replaced by ``block``.

    Raises:
        ValueError: the markers are missing.
    """
    if embedded(readme, start, end) is None:
        raise ValueError(f"the page has no {start} ... {end} markers")
    first = readme.find(start) + len(start)
    last = readme.find(end)
    return readme[:first] + "\n" + block.strip() + "\n" + readme[last:]
