"""Where a fuzz run's ledger lives: a SQLite file in the run's folder, or a PostgreSQL schema.

The fuzz engine is backend-neutral: it opens stores through :func:`impl.open_store` and
reads the outcome through the Store API. What differs per backend is here, behind
:class:`Ledger`: the target each process opens (on PostgreSQL every process gets its own
``application_name``, so the parent can find a worker's sessions on the server), the
database-level integrity check (SQLite's ``integrity_check``; PostgreSQL has none to run
from a client), the server-side disconnects only PostgreSQL can do, and what happens to
the ledger when the run ends.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from attrs import frozen

from impl.fuzz.sink import integrity_of
from model.errors import ConfigError

POSTGRES_PREFIXES = ("postgresql://", "postgres://")
SQLITE_FILE = "ledger.sqlite"


class Ledger(Protocol):
    """The ledger database of one fuzz run, as the engine sees it."""

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        ...

    @property
    def schema(self) -> str | None:
        """The PostgreSQL schema holding the ledger (None for SQLite)."""
        ...

    @property
    def can_disconnect(self) -> bool:
        """True when :meth:`disconnect` can cut a worker's sessions from the server side."""
        ...

    def target(self, process: str) -> str:
        """The ``open_store`` target for the process named ``process`` ("parent" or a worker)."""
        ...

    def integrity(self) -> dict[str, str]:
        """The database-level integrity verdicts to hand to the checker ("ok" when intact)."""
        ...

    def disconnect(self, process: str) -> int:
        """Terminate ``process``'s sessions from the server side; return how many ended."""
        ...

    def where(self) -> str:
        """Where the ledger is, for the report (never a password)."""
        ...

    def close(self, *, discard: bool) -> None:
        """Release the ledger's resources; with ``discard``, delete the ledger itself."""
        ...


@frozen
class SqliteLedger:
    """The ledger as one SQLite file in the run's folder (deleted with the folder)."""

    path: Path

    @property
    def backend(self) -> str:
        """Always ``"sqlite"``."""
        return "sqlite"

    @property
    def schema(self) -> str | None:
        """Always None: SQLite has no schemas."""
        return None

    @property
    def can_disconnect(self) -> bool:
        """False: an embedded database has no server to cut a session from."""
        return False

    def target(self, process: str) -> str:
        """The file's path, the same for every process."""
        return str(self.path)

    def integrity(self) -> dict[str, str]:
        """SQLite's ``integrity_check`` of the ledger file."""
        return {"ledger": integrity_of(self.path)}

    def disconnect(self, process: str) -> int:
        """Nothing to disconnect: always 0."""
        return 0

    def where(self) -> str:
        """The file's path."""
        return str(self.path)

    def close(self, *, discard: bool) -> None:
        """Nothing to do: the run's folder holds the file and its fate."""


def is_postgres(db: str | None) -> bool:
    """True when ``db`` is a PostgreSQL URL."""
    return db is not None and db.startswith(POSTGRES_PREFIXES)


def schema_name(seed: int, suffix: str) -> str:
    """The fresh schema of one PostgreSQL run: ``fuzz_<seed>_<suffix>``."""
    if not re.fullmatch(r"[0-9a-f]{1,16}", suffix):
        raise ConfigError(f"a fuzz schema suffix must be 1 to 16 hex digits, got {suffix!r}")
    return f"fuzz_{seed}_{suffix}"


def open_ledger(folder: Path, db: str | None, *, seed: int) -> Ledger:
    """Return the ledger of a run in ``folder``: SQLite there when ``db`` is None, else ``db``.

    Raises:
        ConfigError: ``db`` is neither None nor a PostgreSQL URL.
    """
    if db is None:
        return SqliteLedger(folder / SQLITE_FILE)
    if not is_postgres(db):
        scheme = urlsplit(db).scheme or db
        raise ConfigError(
            f"the fuzz ledger must be None (SQLite in the run's folder) or a postgresql:// URL, "
            f"got {scheme!r}; pass --dir for SQLite"
        )
    # Imported here so that psycopg is needed only by PostgreSQL runs.
    from impl.fuzz.postgres import PostgresLedger  # noqa: PLC0415

    return PostgresLedger.create(db, seed=seed)
