"""The PostgreSQL schema and its forward-only migrations.

Every object lives in one PostgreSQL schema (``Config.postgres_schema``, created when
missing), so a ledger can share a database with other applications or other ledgers.

Migrations are serialised across processes and machines by ``pg_advisory_xact_lock`` on
a key derived from the schema's name, and each one is recorded in ``schema_migrations``
in the same transaction that applies it: a crash leaves both or neither, and of several
concurrent openers exactly one applies a step while the others wait and then find it
done. A schema whose recorded version is newer than :data:`SCHEMA_VERSION` is refused
with :class:`SchemaVersionError` before anything is written.

The state machine is enforced by the database too: the trigger ``jobs_guard`` rejects
(SQLSTATE ``JL001``) any change of ``jobs.state`` that is not a declared edge, an entry
into the workflow's failed state from a non-terminal state, or an operator retry (the
failed state back to ``failed_from`` with a higher token), and (``JL002``) a token that
goes backwards. It also keeps ``jobs.active`` (not terminal) for the partial index that
``lease_next`` scans.
"""

from __future__ import annotations

import hashlib

import psycopg
from attrs import frozen
from psycopg import sql
from psycopg.rows import TupleRow

from model.errors import SchemaVersionError

ILLEGAL_EDGE_SQLSTATE = "JL001"
"""SQLSTATE raised by ``jobs_guard`` for a state change the workflow does not declare."""
FENCE_BACKWARDS_SQLSTATE = "JL002"
"""SQLSTATE raised by ``jobs_guard`` for a fencing token that would decrease."""


@frozen
class Migration:
    """One forward-only schema step: its version, a name and its statements."""

    version: int
    name: str
    statements: tuple[str, ...]


_JOBS_GUARD = """
CREATE FUNCTION jobs_guard() RETURNS trigger
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    flow workflows%ROWTYPE;
    is_terminal boolean;
BEGIN
    SELECT * INTO flow FROM workflows WHERE name = NEW.kind;
    SELECT terminal INTO is_terminal
      FROM workflow_states WHERE kind = NEW.kind AND state = NEW.state;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'job %: % is not a state of workflow %', NEW.job_id, NEW.state, NEW.kind
            USING ERRCODE = 'JL001';
    END IF;
    NEW.active := NOT is_terminal;
    IF TG_OP = 'INSERT' THEN
        IF NEW.state <> flow.initial THEN
            RAISE EXCEPTION 'job %: planned in state %, not the initial state % of workflow %',
                NEW.job_id, NEW.state, flow.initial, NEW.kind
                USING ERRCODE = 'JL001';
        END IF;
        RETURN NEW;
    END IF;
    IF NEW.kind <> OLD.kind OR NEW.job_id <> OLD.job_id THEN
        RAISE EXCEPTION 'job %: its id and kind never change', OLD.job_id
            USING ERRCODE = 'JL001';
    END IF;
    IF NEW.token < OLD.token THEN
        RAISE EXCEPTION 'job %: token % would go back to %', OLD.job_id, OLD.token, NEW.token
            USING ERRCODE = 'JL002';
    END IF;
    IF NEW.state = OLD.state THEN
        RETURN NEW;
    END IF;
    IF NEW.state = flow.failed THEN
        IF OLD.active THEN
            RETURN NEW;
        END IF;
    ELSIF OLD.state = flow.failed THEN
        IF NEW.state = coalesce(OLD.failed_from, flow.initial) AND NEW.token > OLD.token THEN
            RETURN NEW;
        END IF;
    ELSIF EXISTS (
        SELECT 1 FROM workflow_edges
         WHERE kind = NEW.kind AND src = OLD.state AND dst = NEW.state
    ) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'job %: % -> % is not a declared edge of workflow %',
        OLD.job_id, OLD.state, NEW.state, NEW.kind
        USING ERRCODE = 'JL001',
              HINT = 'states only follow declared edges; use fail, cancel or retry';
END
$$
"""

_V1 = (
    """
    CREATE TABLE workflows (
        name text PRIMARY KEY,
        definition text NOT NULL,
        initial text NOT NULL,
        failed text NOT NULL
    )
    """,
    """
    CREATE TABLE workflow_states (
        kind text NOT NULL REFERENCES workflows (name),
        state text NOT NULL,
        terminal boolean NOT NULL,
        PRIMARY KEY (kind, state)
    )
    """,
    """
    CREATE TABLE workflow_edges (
        kind text NOT NULL REFERENCES workflows (name),
        src text NOT NULL,
        dst text NOT NULL,
        PRIMARY KEY (kind, src, dst)
    )
    """,
    """
    CREATE TABLE jobs (
        job_id text PRIMARY KEY,
        seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
        kind text NOT NULL REFERENCES workflows (name),
        identity text NOT NULL,
        payload text NOT NULL,
        state text NOT NULL,
        active boolean NOT NULL DEFAULT true,
        attempts bigint NOT NULL CHECK (attempts >= 0),
        max_attempts bigint NOT NULL CHECK (max_attempts >= 1),
        priority bigint NOT NULL,
        run_at double precision NOT NULL,
        token bigint NOT NULL CHECK (token >= 0),
        lease_worker text,
        lease_expires_at double precision,
        last_error text,
        failed_from text,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        CHECK ((lease_worker IS NULL) = (lease_expires_at IS NULL)),
        CHECK (attempts <= max_attempts)
    )
    """,
    # lease_next walks this index in its ORDER BY and stops at the first row it can lock.
    "CREATE INDEX jobs_ready ON jobs (priority DESC, run_at, seq) WHERE active",
    "CREATE INDEX jobs_leased ON jobs (lease_expires_at) WHERE lease_worker IS NOT NULL",
    "CREATE INDEX jobs_kind_state ON jobs (kind, state)",
    """
    CREATE TABLE effects (
        op_key text PRIMARY KEY,
        seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
        job_id text NOT NULL REFERENCES jobs (job_id),
        op text NOT NULL,
        extras text NOT NULL,
        status text NOT NULL CHECK (status IN ('started', 'in_doubt', 'done')),
        result text,
        started_at double precision NOT NULL,
        finished_at double precision,
        token bigint NOT NULL,
        started_by text NOT NULL,
        CHECK ((status = 'done') = (result IS NOT NULL))
    )
    """,
    "CREATE INDEX effects_job ON effects (job_id, seq)",
    "CREATE INDEX effects_open ON effects (seq) WHERE status <> 'done'",
    """
    CREATE TABLE history (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        job_id text NOT NULL REFERENCES jobs (job_id),
        at double precision NOT NULL,
        event text NOT NULL,
        token bigint NOT NULL,
        worker text,
        detail text NOT NULL
    )
    """,
    "CREATE INDEX history_job ON history (job_id, id)",
    _JOBS_GUARD,
    """
    CREATE TRIGGER jobs_guard
    BEFORE INSERT OR UPDATE OF state, token, kind, job_id, active ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_guard()
    """,
)

# Version 2: a tombstone of every job that prune removes (model.retention), so that
# planning the identity again stays a no-op; and autovacuum that keeps up with prune's
# batched deletes (a pass once 5% of a table is dead, not the default 20%, so the dead
# rows of a big prune are reclaimed while it runs rather than long after).
_V2 = (
    """
    CREATE TABLE tombstones (
        job_id text PRIMARY KEY,
        kind text NOT NULL,
        state text NOT NULL,
        finished_at double precision NOT NULL,
        pruned_at double precision NOT NULL
    )
    """,
    # Counts of finished jobs by watermark, for stats without reading every job and
    # without a write on the hot path (impl/postgres/rollup.py).
    """
    CREATE TABLE state_counts (
        kind text NOT NULL,
        state text NOT NULL,
        n bigint NOT NULL CHECK (n >= 0),
        PRIMARY KEY (kind, state)
    )
    """,
    "CREATE TABLE count_mark (id integer PRIMARY KEY CHECK (id = 1), seq bigint NOT NULL)",
    "INSERT INTO count_mark (id, seq) VALUES (1, 0)",
    "CREATE TABLE count_pending (seq bigint PRIMARY KEY)",
    "ALTER TABLE jobs SET (autovacuum_vacuum_scale_factor = 0.05)",
    "ALTER TABLE effects SET (autovacuum_vacuum_scale_factor = 0.05)",
    "ALTER TABLE history SET (autovacuum_vacuum_scale_factor = 0.05)",
)

# Version 3 records the circuit breakers of the download pipeline (model/breaker.py): one
# row per host and process, written only when a breaker opens or closes.
_V3 = (
    """
    CREATE TABLE breakers (
        host text NOT NULL,
        worker text NOT NULL,
        state text NOT NULL CHECK (state IN ('open', 'closed')),
        failures bigint NOT NULL CHECK (failures >= 0),
        last_error text,
        opened_at double precision,
        until_at double precision,
        changed_at double precision NOT NULL,
        opens bigint NOT NULL CHECK (opens >= 0),
        CHECK ((state = 'open') = (until_at IS NOT NULL)),
        PRIMARY KEY (host, worker)
    )
    """,
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", _V1),
    Migration(2, "tombstones of pruned jobs; counts by watermark; autovacuum for prune", _V2),
    Migration(3, "circuit breakers as each process last recorded them", _V3),
)
"""Every migration, oldest first; append only."""

SCHEMA_VERSION = MIGRATIONS[-1].version
"""The schema version this code writes and understands."""

_LEDGER_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
_SCHEMA_EXISTS = "SELECT 1 FROM pg_namespace WHERE nspname = %(schema)s"
_LEDGER_EXISTS = (
    "SELECT 1 FROM pg_tables WHERE schemaname = %(schema)s AND tablename = 'schema_migrations'"
)
_RECORDED = "SELECT coalesce(max(version), 0) FROM schema_migrations"
_RECORD = "INSERT INTO schema_migrations (version, name) VALUES (%(version)s, %(name)s)"
_LOCK = "SELECT pg_advisory_xact_lock(%(key)s)"


def lock_key(schema: str) -> int:
    """Return the advisory lock key that serialises migrations of ``schema``."""
    digest = hashlib.sha256(f"jobledger:migrate:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def set_search_path(conn: psycopg.Connection[TupleRow], schema: str, *, local: bool) -> None:
    """Point unqualified names at ``schema`` for the session (or this transaction)."""
    conn.execute(search_path(schema, local=local))


def search_path(schema: str, *, local: bool) -> sql.Composed:
    """The statement that points unqualified names at ``schema`` (see set_search_path)."""
    stmt = "SET LOCAL search_path TO {}" if local else "SET search_path TO {}"
    return sql.SQL(stmt).format(sql.Identifier(schema))


def recorded_version(conn: psycopg.Connection[TupleRow], schema: str) -> int:
    """Return the schema version recorded in ``schema`` (0 when nothing is there)."""
    row = conn.execute(_LEDGER_EXISTS, {"schema": schema}).fetchone()
    if row is None:
        return 0
    ident = sql.Identifier(schema, "schema_migrations")
    found = conn.execute(
        sql.SQL("SELECT coalesce(max(version), 0) FROM {}").format(ident)
    ).fetchone()
    return int(found[0]) if found is not None else 0


def check_not_newer(version: int, schema: str) -> None:
    """Refuse a schema written by newer code.

    Raises:
        SchemaVersionError: naming both versions and what to do.
    """
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"PostgreSQL schema {schema!r} is at version {version}, newer than this "
            f"jobledger understands (version {SCHEMA_VERSION}); upgrade jobledger, or use "
            "another schema (postgres_schema)"
        )


def pending(version: int) -> list[Migration]:
    """Return the migrations not yet applied to a schema at ``version``."""
    return [m for m in MIGRATIONS if m.version > version]


def migrate(conn: psycopg.Connection[TupleRow], schema: str) -> int:
    """Create ``schema`` if missing and apply every pending migration; return the version.

    ``conn`` must be in autocommit mode and idle; the whole step is one transaction.

    Raises:
        SchemaVersionError: the schema is newer than this code.
    """
    with conn.transaction():
        conn.execute(_LOCK, {"key": lock_key(schema)})
        # Check before creating: CREATE SCHEMA IF NOT EXISTS still needs the CREATE
        # privilege on the database, which a user of an existing schema may lack.
        if conn.execute(_SCHEMA_EXISTS, {"schema": schema}).fetchone() is None:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        set_search_path(conn, schema, local=True)
        conn.execute(_LEDGER_TABLE)
        row = conn.execute(_RECORDED).fetchone()
        version = int(row[0]) if row is not None else 0
        check_not_newer(version, schema)
        for step in pending(version):
            for statement in step.statements:
                conn.execute(statement)
            conn.execute(_RECORD, {"version": step.version, "name": step.name})
            version = step.version
    return version
