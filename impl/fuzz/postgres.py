"""A fuzz run's ledger on PostgreSQL: a fresh schema, tagged sessions, server-side disconnects.

Each run gets a schema of its own (``fuzz_<seed>_<tag>``), created by the store itself
from ``Config.postgres_schema`` when the parent opens it, so runs never share state even
on a shared server. Every process of the run connects with ``application_name`` set to
``jobledger-fuzz-<tag>-<process>`` (through the URL's query, which the store hands to
psycopg unchanged), so the parent can find one worker's sessions in ``pg_stat_activity``
and terminate them with ``pg_terminate_backend``: the server-side disconnect a failover,
a restart or an operator's kill inflicts. The schema is dropped when a run passes and
kept, named in the report, when it fails.
"""

from __future__ import annotations

import time
import uuid
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from attrs import define, field
from psycopg import sql

from impl.fuzz.ledger import schema_name
from impl.postgres.database import describe
from model.errors import StorageError

APP_PREFIX = "jobledger-fuzz-"
CONNECT_TIMEOUT = 10
DROP_ATTEMPTS = 5

_TERMINATE = (
    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
    "WHERE datname = current_database() AND application_name = %(app)s "
    "AND pid <> pg_backend_pid()"
)
_TERMINATE_RUN = (
    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
    "WHERE datname = current_database() AND application_name LIKE %(pattern)s "
    "AND pid <> pg_backend_pid()"
)
# A straggling session of a SIGKILLed worker may still hold a lock: wait, but not forever.
_LOCK_TIMEOUT = "SET lock_timeout = '10s'"
_DROP = "DROP SCHEMA IF EXISTS {} CASCADE"


def with_application_name(url: str, name: str) -> str:
    """Return ``url`` with its ``application_name`` query parameter set to ``name``."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    query = [(k, v) for k, v in query if k != "application_name"]
    query.append(("application_name", name))
    return urlunsplit(parts._replace(query=urlencode(query)))


@define
class PostgresLedger:
    """The ledger of one run in the fresh schema ``schema`` of the database at ``url``.

    Args:
        url: the ``postgresql://`` URL given for the run.
        schema: the run's own schema (the store creates it on first open).
        tag: the run's tag in every session's ``application_name``.
    """

    url: str
    schema: str
    tag: str
    _admin: psycopg.Connection[tuple[object, ...]] | None = field(default=None, init=False)

    @classmethod
    def create(cls, url: str, *, seed: int) -> PostgresLedger:
        """Return the ledger of a new run in a fresh, randomly named schema."""
        tag = uuid.uuid4().hex[:8]
        return cls(url, schema_name(seed, tag), tag)

    @property
    def backend(self) -> str:
        """Always ``"postgresql"``."""
        return "postgresql"

    @property
    def can_disconnect(self) -> bool:
        """True: the server can terminate a worker's sessions."""
        return True

    def application_name(self, process: str) -> str:
        """The ``application_name`` of ``process``'s sessions."""
        return f"{APP_PREFIX}{self.tag}-{process}"

    def target(self, process: str) -> str:
        """The run's URL, its sessions named after ``process``."""
        return with_application_name(self.url, self.application_name(process))

    def integrity(self) -> dict[str, str]:
        """None to run: PostgreSQL checks its own pages; the checker reads through the API."""
        return {}

    def disconnect(self, process: str) -> int:
        """Terminate every session of ``process`` with ``pg_terminate_backend``.

        Returns:
            How many sessions the server terminated (0 when it had none open).

        Raises:
            StorageError: the parent's own administrator connection failed twice.
        """
        return self._count(_TERMINATE, {"app": self.application_name(process)})

    def _count(self, query: str, params: dict[str, str]) -> int:
        for attempt in (1, 2):
            try:
                row = self._connection().execute(query, params).fetchone()
                return 0 if row is None else int(str(row[0]))
            except psycopg.Error as exc:
                self._drop_admin()
                if attempt == 2:
                    raise StorageError(
                        f"terminate fuzz sessions at {self.where()}: {exc}; check that the "
                        "server is up and that this role may signal the workers' backends"
                    ) from exc
        return 0

    def _connection(self) -> psycopg.Connection[tuple[object, ...]]:
        if self._admin is None or self._admin.closed or self._admin.broken:
            self._admin = psycopg.connect(
                self.target("admin"), autocommit=True, connect_timeout=CONNECT_TIMEOUT
            )
            self._admin.execute(_LOCK_TIMEOUT)
        return self._admin

    def _drop_admin(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None

    def where(self) -> str:
        """``host:port/db schema NAME``."""
        return f"{describe(self.url)} schema {self.schema}"

    def close(self, *, discard: bool) -> None:
        """End the run's remaining sessions; with ``discard``, drop the run's schema.

        A server that is gone by now does not turn a run red: the error goes into the
        exception raised, which the engine reports without hiding the run's verdict.

        Raises:
            StorageError: the schema could not be dropped.
        """
        try:
            if not discard:
                return
            # Sessions of SIGKILLed workers end when the server notices; make sure.
            self._count(_TERMINATE_RUN, {"pattern": f"{APP_PREFIX}{self.tag}-w%"})
            drop = sql.SQL(_DROP).format(sql.Identifier(self.schema))
            for attempt in range(1, DROP_ATTEMPTS + 1):
                try:
                    self._connection().execute(drop)
                    return
                except psycopg.Error as exc:
                    self._drop_admin()
                    if attempt == DROP_ATTEMPTS:
                        raise StorageError(
                            f"drop the fuzz schema {self.where()}: {exc}; drop it by hand"
                        ) from exc
                    time.sleep(0.2 * attempt)
        finally:
            self._drop_admin()
