"""``open_store``: one entry point that picks the backend from the target."""

from __future__ import annotations

import os
from pathlib import Path

from model.clock import Clock
from model.config import Config
from model.errors import ConfigError
from model.memory import MemoryStore
from model.store import Store

MEMORY_TARGETS = ("memory:", "memory://", ":memory:")


def open_store(
    target: str | os.PathLike[str],
    *,
    clock: Clock | None = None,
    config: Config | None = None,
) -> Store:
    """Open (creating and migrating if needed) the store at ``target``.

    Args:
        target: a filesystem path or ``sqlite:///path`` for SQLite (the embedded
            default), ``postgresql://...`` for PostgreSQL, or ``memory:`` for the
            in-memory reference model.
        clock: a zero-argument callable returning seconds; default wall time (on
            PostgreSQL, the database server's time).
        config: tunables; default :class:`Config` with the contract's defaults.

    Returns:
        A store that is also a context manager (closing it on exit).

    Raises:
        ConfigError: for a target this code cannot open.
        StorageError: (and subclasses) when the database cannot be used.
    """
    cfg = config if config is not None else Config()
    text = os.fspath(target)
    if not isinstance(text, str) or not text:
        raise ConfigError(f"store target must be a non-empty path or URL, got {target!r}")
    if text in MEMORY_TARGETS:
        return MemoryStore(clock=clock, config=cfg)
    if text.startswith(("postgresql://", "postgres://")):
        # Imported here so that psycopg is needed only by PostgreSQL users.
        from impl.postgres.store import PostgresStore  # noqa: PLC0415

        return PostgresStore(text, clock=clock, config=cfg)
    if text.startswith("sqlite://"):
        path = text.removeprefix("sqlite://")
        # sqlite:///abs/path keeps its leading slash; sqlite://rel/path is relative.
        text = path
    elif "://" in text:
        scheme = text.split("://", 1)[0]
        raise ConfigError(
            f"cannot open store target {text!r}: unknown scheme {scheme!r}; use a file path, "
            "sqlite:///path, postgresql://... or memory:"
        )
    from impl.sqlite.store import SqliteStore  # noqa: PLC0415  (keeps `import impl` light)

    return SqliteStore(Path(text), clock=clock, config=cfg)
