"""The SQLite schema and its forward-only migrations.

Each migration is a tuple of single statements (``executescript`` would commit behind our
back). A migration and the row recording it in ``schema_migrations`` are written in the
same ``BEGIN IMMEDIATE`` transaction, so a crash leaves either both or neither; concurrent
openers serialise on the write lock and re-read the version inside it, so each migration
runs exactly once. A database whose recorded version is newer than :data:`SCHEMA_VERSION`
is refused with :class:`SchemaVersionError` before anything is written to it.

The state machine is enforced twice: by the store's own checks and by the trigger
``jobs_state_follows_edges``, which aborts any ``UPDATE`` of ``jobs.state`` that is not a
declared edge, an entry into the failed state from a non-terminal state, or an operator
retry (failed state back to ``failed_from`` with a higher token).
"""

from __future__ import annotations

import sqlite3

from attrs import frozen

from impl.sqlite import queries as q
from model.errors import SchemaVersionError


@frozen
class Migration:
    """One forward-only schema step."""

    version: int
    name: str
    statements: tuple[str, ...]


# The state machine and the fencing token, enforced by the database itself (every
# schema version keeps them).
_STATE_TRIGGER = """
    CREATE TRIGGER jobs_state_follows_edges BEFORE UPDATE OF state ON jobs
    WHEN NEW.state IS NOT OLD.state
     AND NOT EXISTS (
        SELECT 1 FROM workflow_edges
        WHERE kind = OLD.kind AND src = OLD.state AND dst = NEW.state)
     AND NOT (OLD.terminal = 0
        AND NEW.state IS (SELECT failed FROM workflows WHERE name = OLD.kind))
     AND NOT (OLD.state IS (SELECT failed FROM workflows WHERE name = OLD.kind)
        AND NEW.state IS OLD.failed_from AND NEW.token > OLD.token)
    BEGIN
        SELECT RAISE(ABORT, 'jobledger: illegal state transition: not a declared edge');
    END
    """

_FENCING_TRIGGER = """
    CREATE TRIGGER jobs_token_never_decreases BEFORE UPDATE OF token ON jobs
    WHEN NEW.token < OLD.token
    BEGIN
        SELECT RAISE(ABORT, 'jobledger: a job''s fencing token never decreases');
    END
    """

_V1 = (
    """
    CREATE TABLE workflows (
        name TEXT PRIMARY KEY,
        definition TEXT NOT NULL,
        initial TEXT NOT NULL,
        failed TEXT NOT NULL
    )
    """,
    """
    CREATE TABLE workflow_states (
        kind TEXT NOT NULL REFERENCES workflows (name),
        state TEXT NOT NULL,
        terminal INTEGER NOT NULL CHECK (terminal IN (0, 1)),
        PRIMARY KEY (kind, state)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE workflow_edges (
        kind TEXT NOT NULL REFERENCES workflows (name),
        src TEXT NOT NULL,
        dst TEXT NOT NULL,
        PRIMARY KEY (kind, src, dst)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE jobs (
        job_id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL UNIQUE,
        kind TEXT NOT NULL REFERENCES workflows (name),
        identity TEXT NOT NULL,
        payload TEXT NOT NULL,
        state TEXT NOT NULL,
        terminal INTEGER NOT NULL DEFAULT 0 CHECK (terminal IN (0, 1)),
        attempts INTEGER NOT NULL CHECK (attempts >= 0),
        max_attempts INTEGER NOT NULL CHECK (max_attempts >= 1),
        priority INTEGER NOT NULL,
        run_at REAL NOT NULL,
        token INTEGER NOT NULL CHECK (token >= 0),
        lease_worker TEXT,
        lease_expires_at REAL,
        last_error TEXT,
        failed_from TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        CHECK ((lease_worker IS NULL) = (lease_expires_at IS NULL)),
        CHECK (attempts <= max_attempts)
    )
    """,
    # The claim index: only active (non-terminal), unleased rows, in exactly lease_next's
    # order, so a claim is one ordered walk that live leases never slow down. Rows whose
    # lease expired are found through jobs_lease instead (see queries.SELECT_CANDIDATE).
    """
    CREATE INDEX jobs_claim ON jobs (priority DESC, run_at, seq)
    WHERE terminal = 0 AND lease_worker IS NULL
    """,
    "CREATE INDEX jobs_kind_state ON jobs (kind, state)",
    "CREATE INDEX jobs_state ON jobs (state)",
    "CREATE INDEX jobs_lease ON jobs (lease_expires_at) WHERE lease_worker IS NOT NULL",
    """
    CREATE TABLE effects (
        op_key TEXT PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs (job_id),
        op TEXT NOT NULL,
        extras TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('started', 'in_doubt', 'done')),
        result TEXT,
        started_at REAL NOT NULL,
        finished_at REAL,
        token INTEGER NOT NULL,
        started_by TEXT NOT NULL,
        seq INTEGER NOT NULL,
        CHECK ((status = 'done') = (result IS NOT NULL))
    )
    """,
    "CREATE INDEX effects_job ON effects (job_id, seq)",
    "CREATE INDEX effects_open ON effects (status) WHERE status != 'done'",
    """
    CREATE TABLE history (
        id INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs (job_id),
        at REAL NOT NULL,
        event TEXT NOT NULL,
        token INTEGER NOT NULL,
        worker TEXT,
        detail TEXT NOT NULL
    )
    """,
    "CREATE INDEX history_job ON history (job_id, id)",
    _STATE_TRIGGER,
    _FENCING_TRIGGER,
)

# Version 2 rebuilds the three hot tables for fewer page writes per transaction (each
# page a commit dirties is one WAL frame, and frames are what a commit costs):
# - jobs: ``seq`` becomes the rowid (no separate seq index, no max(seq) lookup per plan);
#   the redundant ``jobs_state`` index is gone (``jobs_kind_state`` serves the counts);
# - effects: WITHOUT ROWID, keyed by (job_id, op_key), so a start or a result touches one
#   b-tree page for the row (every caller knows the job of an op key: it is hashed in);
# - history: WITHOUT ROWID, keyed by (job_id, id) with ``id`` counting per job, so an entry
#   lands beside the job's other entries instead of in a table and an index.
# Foreign keys from jobs, effects and history are dropped: checking them was a lookup per
# insert on the hot path. Integrity holds by construction instead: jobs are never deleted,
# effects and history rows are written only in a transaction that has just read (and
# fenced) their job's row, and jobs are planned only for a kind the catalog just found.
_V2 = (
    """
    CREATE TABLE jobs_v2 (
        seq INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        identity TEXT NOT NULL,
        payload TEXT NOT NULL,
        state TEXT NOT NULL,
        terminal INTEGER NOT NULL DEFAULT 0 CHECK (terminal IN (0, 1)),
        attempts INTEGER NOT NULL CHECK (attempts >= 0),
        max_attempts INTEGER NOT NULL CHECK (max_attempts >= 1),
        priority INTEGER NOT NULL,
        run_at REAL NOT NULL,
        token INTEGER NOT NULL CHECK (token >= 0),
        lease_worker TEXT,
        lease_expires_at REAL,
        last_error TEXT,
        failed_from TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        CHECK ((lease_worker IS NULL) = (lease_expires_at IS NULL)),
        CHECK (attempts <= max_attempts)
    )
    """,
    """
    INSERT INTO jobs_v2 (
        seq, job_id, kind, identity, payload, state, terminal, attempts, max_attempts,
        priority, run_at, token, lease_worker, lease_expires_at, last_error, failed_from,
        created_at, updated_at
    )
    SELECT seq, job_id, kind, identity, payload, state, terminal, attempts, max_attempts,
        priority, run_at, token, lease_worker, lease_expires_at, last_error, failed_from,
        created_at, updated_at
    FROM jobs ORDER BY seq
    """,
    """
    CREATE TABLE effects_v2 (
        job_id TEXT NOT NULL,
        op_key TEXT NOT NULL,
        op TEXT NOT NULL,
        extras TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('started', 'in_doubt', 'done')),
        result TEXT,
        started_at REAL NOT NULL,
        finished_at REAL,
        token INTEGER NOT NULL,
        started_by TEXT NOT NULL,
        seq INTEGER NOT NULL,
        CHECK ((status = 'done') = (result IS NOT NULL)),
        PRIMARY KEY (job_id, op_key)
    ) WITHOUT ROWID
    """,
    """
    INSERT INTO effects_v2 (
        job_id, op_key, op, extras, status, result, started_at, finished_at, token,
        started_by, seq
    )
    SELECT job_id, op_key, op, extras, status, result, started_at, finished_at, token,
        started_by, seq
    FROM effects
    """,
    """
    CREATE TABLE history_v2 (
        job_id TEXT NOT NULL,
        id INTEGER NOT NULL,
        at REAL NOT NULL,
        event TEXT NOT NULL,
        token INTEGER NOT NULL,
        worker TEXT,
        detail TEXT NOT NULL,
        PRIMARY KEY (job_id, id)
    ) WITHOUT ROWID
    """,
    # The old ids were global and increasing, so within a job they keep their order.
    """
    INSERT INTO history_v2 (job_id, id, at, event, token, worker, detail)
    SELECT job_id, id, at, event, token, worker, detail FROM history
    """,
    # Children first: dropping jobs while rows still referenced it would fail.
    "DROP TABLE history",
    "DROP TABLE effects",
    "DROP TABLE jobs",
    "ALTER TABLE jobs_v2 RENAME TO jobs",
    "ALTER TABLE effects_v2 RENAME TO effects",
    "ALTER TABLE history_v2 RENAME TO history",
    # The claim index: only active (non-terminal), unleased rows, in exactly lease_next's
    # order, so a claim is one ordered walk that live leases never slow down. Rows whose
    # lease expired are found through jobs_lease instead (see queries.SELECT_CANDIDATE).
    """
    CREATE INDEX jobs_claim ON jobs (priority DESC, run_at, seq)
    WHERE terminal = 0 AND lease_worker IS NULL
    """,
    "CREATE INDEX jobs_kind_state ON jobs (kind, state)",
    "CREATE INDEX jobs_lease ON jobs (lease_expires_at) WHERE lease_worker IS NOT NULL",
    "CREATE INDEX effects_open ON effects (status) WHERE status != 'done'",
    _STATE_TRIGGER,
    _FENCING_TRIGGER,
)

# Version 3 keeps most of a job's history out of the history table, because a history
# row was one more b-tree page written by every transaction, and pages written are what
# a commit costs. Every entry has a position (an integer, increasing in the order the
# entries were written); the entries live in three places and a read merges them:
# - ``jobs.hist``: entries of the transactions that write the job's row anyway (planned,
#   leased, advanced, ...), appended inline as JSON lines ``[at, event, token, worker,
#   detail]``. ``jobs.hist_n`` counts these row entries and the n-th is at n * 2**32
#   (queries.HISTORY_GAP); the inline lines are the last ones, moved to ``history`` with
#   their positions once the text is long;
# - ``effects.start_n`` / ``effects.finish_n``: the positions of an effect's started and
#   recorded entries, read from the effect's own row (its time, token, worker and op),
#   which the start and the result write anyway. They take the next free position after
#   the last row entry, so they sort between the row entries around them. Before a row
#   is changed in a way that would lose an entry (a restart after doubt, an abort, a
#   probed result) the entry is copied to ``history``;
# - ``history``: everything else (row entries once the inline text is long, entries copied
#   out of effect rows, and every entry written before version 3, renumbered here).
_V3 = (
    "ALTER TABLE jobs ADD COLUMN hist TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE jobs ADD COLUMN hist_n INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE effects ADD COLUMN start_n INTEGER",
    "ALTER TABLE effects ADD COLUMN finish_n INTEGER",
    # The attempt of the job that started the effect (NULL for starts before version 3).
    "ALTER TABLE effects ADD COLUMN attempt INTEGER",
    """
    CREATE TABLE history_v3 (
        job_id TEXT NOT NULL,
        id INTEGER NOT NULL,
        at REAL NOT NULL,
        event TEXT NOT NULL,
        token INTEGER NOT NULL,
        worker TEXT,
        detail TEXT NOT NULL,
        PRIMARY KEY (job_id, id)
    ) WITHOUT ROWID
    """,
    """
    INSERT INTO history_v3 (job_id, id, at, event, token, worker, detail)
    SELECT job_id, id * 4294967296, at, event, token, worker, detail FROM history
    """,
    "DROP TABLE history",
    "ALTER TABLE history_v3 RENAME TO history",
    """
    UPDATE jobs SET hist_n = ifnull(
        (SELECT max(h.id) FROM history AS h WHERE h.job_id = jobs.job_id), 0) / 4294967296
    """,
    # One index of the active jobs in lease_next's order replaces the claim index of
    # unleased rows and the index of leased ones: both were written twice per job (when
    # its lease began and when it ended). Leases are found by walking the active jobs
    # (leased jobs are never terminal); see queries.SELECT_CANDIDATE.
    "DROP INDEX jobs_claim",
    "DROP INDEX jobs_lease",
    "CREATE INDEX jobs_active ON jobs (priority DESC, run_at, seq) WHERE terminal = 0",
    # The index of open effects was written twice per effect (at its start and at its
    # result). Only starts in doubt need finding: those marked in doubt, and those whose
    # lease ended or whose token moved on, which the trigger below flags when it happens
    # (at most one read of the job's few effect rows when a lease ends). Starts under a
    # lease that merely ran out are found through the expired leases among active jobs.
    "ALTER TABLE effects ADD COLUMN doubt INTEGER NOT NULL DEFAULT 0 CHECK (doubt IN (0, 1))",
    """
    UPDATE effects SET doubt = 1
    WHERE status = 'in_doubt' OR (status = 'started' AND EXISTS (
        SELECT 1 FROM jobs AS j WHERE j.job_id = effects.job_id
          AND (j.token != effects.token OR j.lease_worker IS NULL)))
    """,
    "DROP INDEX effects_open",
    "CREATE INDEX effects_doubt ON effects (job_id) WHERE doubt = 1",
    """
    CREATE TRIGGER effects_doubt_when_lease_ends AFTER UPDATE OF token, lease_worker ON jobs
    WHEN OLD.lease_worker IS NOT NULL
     AND (NEW.lease_worker IS NULL OR NEW.token IS NOT OLD.token)
    BEGIN
        UPDATE effects SET doubt = 1
        WHERE job_id = NEW.job_id AND status = 'started' AND doubt = 0;
    END
    """,
)

# Version 4 drops the (kind, state) index: every planned job and every state change wrote
# it, and only the operator's counts read it. Counting scans the table instead (about
# 0.6 s per million jobs), and the failed count is read off the same counts.
# From version 4 on, a new job's PLANNED entry is not written into ``jobs.hist``: it is
# the row's first entry (position 1 * 2**32, ``hist_n`` counts it) at ``created_at``,
# token 0, no worker, and a history that stores no PLANNED entry anywhere reads it from
# there. Rows planned before keep theirs where they are (inline, or in ``history``).
_V4 = ("DROP INDEX jobs_kind_state",)

# Version 5 also keeps the counts of finished jobs for ``stats`` without a write on the
# hot path (see impl/sqlite/rollup.py): ``state_counts`` holds, by kind and state, the
# terminal jobs up to the watermark ``count_mark.seq``, except the jobs listed in
# ``count_pending`` (those that were active when the watermark passed them, or that an
# operator's retry made active again). The watermark starts at 0: an existing ledger's
# jobs are folded in by the first passes (reconcile, stats), a bounded step each.
#
# Version 5 keeps a tombstone of every job that ``prune`` removes (model.retention): the
# key, the kind, the final state and when it finished, so that planning the identity
# again stays a no-op. Compact (about 100 bytes a key) and read by plan only through its
# primary key. The space a prune frees is given back by incremental vacuum, which needs
# ``auto_vacuum = INCREMENTAL`` from before the first table: new files get it when they
# are opened (connection.open_connection); a file created before has ``auto_vacuum =
# NONE`` and needs one offline ``VACUUM`` to switch (specs/009-retention.md).
_V5 = (
    """
    CREATE TABLE tombstones (
        job_id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        state TEXT NOT NULL,
        finished_at REAL NOT NULL,
        pruned_at REAL NOT NULL
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE state_counts (
        kind TEXT NOT NULL,
        state TEXT NOT NULL,
        n INTEGER NOT NULL CHECK (n >= 0),
        PRIMARY KEY (kind, state)
    ) WITHOUT ROWID
    """,
    "CREATE TABLE count_mark (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL)",
    "INSERT INTO count_mark (id, seq) VALUES (1, 0)",
    "CREATE TABLE count_pending (seq INTEGER PRIMARY KEY)",
)

# Version 6 records the circuit breakers of the download pipeline (model/breaker.py): one
# row per host and process, written only when a breaker opens or closes, so that
# ``jobledger status`` can show them. Rows are few (hosts x processes) and read whole.
_V6 = (
    """
    CREATE TABLE breakers (
        host TEXT NOT NULL,
        worker TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('open', 'closed')),
        failures INTEGER NOT NULL CHECK (failures >= 0),
        last_error TEXT,
        opened_at REAL,
        until_at REAL,
        changed_at REAL NOT NULL,
        opens INTEGER NOT NULL CHECK (opens >= 0),
        CHECK ((state = 'open') = (until_at IS NOT NULL)),
        PRIMARY KEY (host, worker)
    ) WITHOUT ROWID
    """,
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", _V1),
    Migration(2, "leaner hot tables: fewer pages written per transaction", _V2),
    Migration(3, "history inline in the rows each transaction writes anyway", _V3),
    Migration(4, "no index written by every plan and state change for the counts alone", _V4),
    Migration(5, "tombstones of pruned jobs; counts of finished jobs by watermark", _V5),
    Migration(6, "circuit breakers as each process last recorded them", _V6),
)
"""Every migration, in version order. Append only; never edit a shipped one."""

SCHEMA_VERSION = MIGRATIONS[-1].version
"""The schema version this code writes and understands."""


def recorded_version(conn: sqlite3.Connection) -> int:
    """Return the highest migration recorded in the database, 0 for a fresh file."""
    if conn.execute(q.MIGRATIONS_TABLE_EXISTS).fetchone() is None:
        return 0
    row = conn.execute(q.SELECT_SCHEMA_VERSION).fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0


def check_not_newer(version: int, path: str) -> None:
    """Raise :class:`SchemaVersionError` if ``version`` is newer than this code."""
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"opening {path}: its schema is version {version}, but this jobledger "
            f"understands versions up to {SCHEMA_VERSION}; upgrade jobledger to open it "
            "(the database was left unchanged)"
        )


def pending(version: int) -> list[Migration]:
    """Return the migrations newer than ``version``, in order."""
    return [m for m in MIGRATIONS if m.version > version]


def migrate(conn: sqlite3.Connection, path: str, now: float) -> int:
    """Apply every pending migration, one transaction each; return the final version.

    Raises:
        SchemaVersionError: if the database is newer than this code.
    """
    version = recorded_version(conn)
    check_not_newer(version, path)
    for migration in pending(version):
        conn.execute(q.BEGIN_IMMEDIATE)
        try:
            # Another process may have migrated while we waited for the write lock.
            current = recorded_version(conn)
            check_not_newer(current, path)
            if current < migration.version:
                conn.execute(q.CREATE_MIGRATIONS_TABLE)
                for statement in migration.statements:
                    conn.execute(statement)
                conn.execute(q.INSERT_MIGRATION, (migration.version, migration.name, now))
            conn.execute(q.COMMIT)
        except BaseException:
            if conn.in_transaction:
                conn.execute(q.ROLLBACK)
            raise
    return max(recorded_version(conn), version)
