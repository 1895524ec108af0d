"""PostgreSQL test support: reachability check (loud in CI) and one reused schema per process.

Creating and migrating a schema costs about half a second, and the conformance suite has
hundreds of PostgreSQL tests, so each test process (each xdist worker, or ``main``) creates
one schema the first time a test needs it and every test then starts by emptying it: the
jobs, their effects and history, and every workflow but the built-in ``download`` one. The
schemas this session created are dropped by :func:`drop_session_schemas` (called by a
session finalizer, and by ``atexit`` as a backstop); schemas of other sessions are left
alone, since another run may be using them.
"""

from __future__ import annotations

import atexit
import os
import sys
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import pytest

from model import Config, ManualClock, Store
from model.workflow import DOWNLOAD

if TYPE_CHECKING:
    import psycopg

PG_URL = os.environ.get("JOBLEDGER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")

LEDGER_TABLES = frozenset(
    {
        "schema_migrations",
        "workflows",
        "workflow_states",
        "workflow_edges",
        "jobs",
        "effects",
        "history",
        "tombstones",
        "state_counts",
        "count_mark",
        "count_pending",
        "breakers",
    }
)
"""Every table impl/postgres/schema.py creates; a new one must be emptied by ``_RESET`` too."""

# Children before parents (history and effects reference jobs, jobs and the workflow
# tables reference workflows). The built-in workflow stays: every store re-registers it.
_RESET = """
DELETE FROM {history};
DELETE FROM {tombstones};
DELETE FROM {breakers};
DELETE FROM {state_counts};
DELETE FROM {count_pending};
UPDATE {count_mark} SET seq = 0;
DELETE FROM {effects};
DELETE FROM {jobs};
DELETE FROM {edges} WHERE kind <> 'download';
DELETE FROM {states} WHERE kind <> 'download';
DELETE FROM {workflows} WHERE name <> 'download';
"""
assert DOWNLOAD.name == "download", "_RESET keeps the built-in workflow by this name"

# A test that leaked a transaction holding a lock fails the next test loudly, not forever.
_LOCK_TIMEOUT = "SET lock_timeout = '10s'"


def _reachable() -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'jobledger[postgres]')"
    try:
        with psycopg.connect(PG_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"PostgreSQL at {PG_URL} is unreachable: {exc}"
    return None


_STATUS: list[str | None] = []


def require_postgres() -> None:
    """Skip (outside CI) or fail (in CI) when PostgreSQL cannot be used."""
    if not _STATUS:
        _STATUS.append(_reachable())
    why = _STATUS[0]
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI requires PostgreSQL (.ci/run starts it)", pytrace=False)
    pytest.skip(f"{why}; start PostgreSQL on 127.0.0.1:5432 or set JOBLEDGER_TEST_PG")


@attrs.define
class _Session:
    """This process's reused schema and its administrator connection."""

    pid: int
    schema: str
    # Imported lazily at run time: psycopg is an optional dependency.
    conn: psycopg.Connection[tuple[object, ...]] | None = None


_SESSIONS: dict[int, _Session] = {}
"""The schema created by each process (keyed by pid: a forked child makes its own)."""


def session_schema_name() -> str:
    """Return a new schema name for this process: the xdist worker id and a random suffix."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    tag = "".join(c for c in worker.lower() if c.isalnum())[:16] or "main"
    return f"t_{tag}_{uuid.uuid4().hex[:12]}"


def _connect() -> psycopg.Connection[tuple[object, ...]]:
    import psycopg

    conn = psycopg.connect(PG_URL, autocommit=True, connect_timeout=10)
    conn.execute(_LOCK_TIMEOUT)
    return conn


def _create(schema: str) -> None:
    """Create and migrate ``schema`` (through the store itself) and check its tables."""
    import psycopg
    from psycopg import sql

    from impl.postgres.store import PostgresStore

    PostgresStore(PG_URL, config=Config(postgres_schema=schema)).close()
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        ).fetchall()
    extra = {str(row[0]) for row in rows} - LEDGER_TABLES
    if extra:
        raise AssertionError(
            f"schema {schema} has tables tests/pg.py does not empty between tests: "
            f"{sorted(extra)}; add them to LEDGER_TABLES and _RESET"
        )


def _session() -> _Session:
    pid = os.getpid()
    found = _SESSIONS.get(pid)
    if found is None:
        found = _Session(pid=pid, schema=session_schema_name())
        # Recorded before creating, so a half-created schema is still dropped at the end.
        _SESSIONS[pid] = found
        _create(found.schema)
    return found


def _reset(session: _Session) -> None:
    """Empty the session's schema: no jobs, effects, history or test workflows."""
    import psycopg
    from psycopg import sql

    def ident(table: str) -> sql.Identifier:
        return sql.Identifier(session.schema, table)

    statement = sql.SQL(_RESET).format(
        history=ident("history"),
        tombstones=ident("tombstones"),
        breakers=ident("breakers"),
        state_counts=ident("state_counts"),
        count_pending=ident("count_pending"),
        count_mark=ident("count_mark"),
        effects=ident("effects"),
        jobs=ident("jobs"),
        edges=ident("workflow_edges"),
        states=ident("workflow_states"),
        workflows=ident("workflows"),
    )
    for attempt in (1, 2):
        conn = session.conn
        if conn is None or conn.closed or conn.broken:
            conn = session.conn = _connect()
        try:
            # One round trip: without parameters, the statements go as one simple query,
            # which PostgreSQL runs as one transaction.
            conn.execute(statement)
            return
        except psycopg.OperationalError:
            # A test may have terminated every backend (a server restart drill).
            conn.close()
            session.conn = None
            if attempt == 2:
                raise


def postgres_factory(clock: ManualClock) -> tuple[Callable[..., Store], Callable[[], None]]:
    """Return a factory opening stores in this process's schema, emptied for this test.

    The second item is the test's cleanup; the schema outlives the test (it is emptied
    again by the next one and dropped by :func:`drop_session_schemas`), so it does nothing
    and is kept so callers need not know.
    """
    from impl.postgres.store import PostgresStore

    session = _session()
    _reset(session)
    schema = session.schema

    def make(*, config: Config | None = None) -> Store:
        cfg = attrs.evolve(config if config is not None else Config(), postgres_schema=schema)
        return PostgresStore(PG_URL, clock=clock, config=cfg)

    def cleanup() -> None:
        pass

    return make, cleanup


def drop_session_schemas() -> None:
    """Drop the schemas this process created (only those: other runs may share the server).

    Idempotent; call it from a session-scoped finalizer. Errors are reported, not raised:
    a server gone at the end of the run must not turn a green run red.
    """
    mine = [s for s in _SESSIONS.values() if s.pid == os.getpid()]
    if not mine:
        # Nothing created here (or already dropped): psycopg may not even be installed.
        return
    import psycopg
    from psycopg import sql

    for session in mine:
        del _SESSIONS[session.pid]
        if session.conn is not None:
            session.conn.close()
        try:
            with psycopg.connect(PG_URL, autocommit=True, connect_timeout=5) as conn:
                conn.execute(_LOCK_TIMEOUT)
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                        sql.Identifier(session.schema)
                    )
                )
        except psycopg.Error as exc:
            print(f"tests/pg.py: could not drop schema {session.schema}: {exc}", file=sys.stderr)


atexit.register(drop_session_schemas)
