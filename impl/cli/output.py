"""How the command prints: JSON for scripts, rich tables for people, times and ids.

JSON output is the records' fields as they are (times as the store's clock seconds);
human output shortens ids to 12 characters (any unique prefix is accepted back) and shows
times as UTC.
"""

from __future__ import annotations

import enum
import json
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime

import attrs
import click
from rich import box
from rich.console import Console
from rich.table import Table

SHORT_ID = 12
PIPE_WIDTH = 160


def plain(value: object) -> object:
    """Return ``value`` as plain JSON-ready data: attrs records become dicts, in field order."""
    kind = type(value)
    if attrs.has(kind):
        return {f.name: plain(getattr(value, f.name)) for f in attrs.fields(kind)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    return value


def print_json(value: object) -> None:
    """Print ``value`` as indented JSON on stdout."""
    click.echo(json.dumps(plain(value), indent=2, ensure_ascii=False, allow_nan=False))


def console() -> Console:
    """Return a console on the current stdout (created per command, so test runners see it).

    Output to a pipe or file is laid out for :data:`PIPE_WIDTH` columns (or ``COLUMNS``)
    rather than rich's 80, so tables of ids stay on one line per row for ``grep``.
    """
    width = None
    if not sys.stdout.isatty():
        try:
            width = int(os.environ.get("COLUMNS", PIPE_WIDTH))
        except ValueError:
            width = PIPE_WIDTH
    return Console(highlight=False, soft_wrap=False, width=width)


def table(*columns: str, title: str | None = None) -> Table:
    """Return a rich table with the given column headers; only the last column wraps."""
    out = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False
    )
    for i, column in enumerate(columns):
        last = i == len(columns) - 1
        out.add_column(column, overflow="fold" if last else "ellipsis", no_wrap=not last)
    return out


def short(job_id: str) -> str:
    """Return the first characters of a job id, enough to tell jobs apart in a table."""
    return job_id[:SHORT_ID]


def when(seconds: float | None, *, precise: bool = False) -> str:
    """Return clock seconds as a UTC time (to the millisecond if ``precise``), or '-'."""
    if seconds is None:
        return "-"
    try:
        text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        return text[:-3] if precise else text[:-7]
    except (OverflowError, OSError, ValueError):
        return f"{seconds:.3f}"


def duration(seconds: float | None) -> str:
    """Return a duration in seconds as short text (``'4.2 s'``, ``'3 min 5 s'``), or '-'."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def time_left(expires_at: float, *, now: float) -> str:
    """Return how long a lease still has at ``now``, or how long ago it expired.

    ``now`` is the store's clock (``store.now()``): lease times are in that clock, which
    on PostgreSQL is the server's and in tests an injected one, not this machine's.
    """
    left = expires_at - now
    if left > 0:
        return duration(left) + " left"
    return "expired " + duration(-left) + " ago"


def clip(text: str | None, width: int = 60) -> str:
    """Return ``text`` on one line, cut to ``width`` characters."""
    if text is None:
        return "-"
    one = " ".join(text.split())
    return one if len(one) <= width else one[: width - 1] + "…"


def compact(value: object, width: int = 60) -> str:
    """Return a JSON value as one short line."""
    return clip(json.dumps(plain(value), ensure_ascii=False, sort_keys=True), width)
