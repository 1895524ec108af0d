"""The SQLite backend: the embedded, default home of a job ledger.

:class:`impl.sqlite.store.SqliteStore` implements the ``Store`` protocol on one SQLite
file in WAL mode. The schema and its migrations live in :mod:`impl.sqlite.schema`, every
SQL statement in :mod:`impl.sqlite.queries`, connections, pragmas, transactions and error
translation in :mod:`impl.sqlite.connection`.
"""

from __future__ import annotations

from impl.sqlite.store import SqliteStore

__all__ = ["SqliteStore"]
