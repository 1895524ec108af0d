"""The physical limit on SQLite: a job ledger in a few lines of raw SQL.

This is the baseline the SQLite benchmarks compare against: the same durability (WAL,
the same ``synchronous``), an index-friendly claim, and exactly three transactions per
job (claim, record the effect, finish). It keeps no history, checks no workflow and
decodes nothing, which is what makes it the limit rather than a competitor.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS jobs (
        seq INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        identity TEXT NOT NULL,
        payload TEXT NOT NULL,
        state TEXT NOT NULL,
        done INTEGER NOT NULL DEFAULT 0,
        run_at REAL NOT NULL,
        token INTEGER NOT NULL DEFAULT 0,
        lease_worker TEXT,
        lease_expires_at REAL
    )
    """,
    "CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (run_at, seq) WHERE done = 0",
    """
    CREATE TABLE IF NOT EXISTS effects (
        op_key TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        result TEXT NOT NULL
    )
    """,
)

INSERT = (
    "INSERT INTO jobs (job_id, kind, identity, payload, state, run_at) "
    "VALUES (?, ?, ?, ?, 'PLANNED', ?)"
)
CLAIM = """
UPDATE jobs SET token = token + 1, lease_worker = ?, lease_expires_at = ?
WHERE seq = (
    SELECT seq FROM jobs WHERE done = 0 AND run_at <= ? AND ifnull(lease_expires_at, 0) <= ?
    ORDER BY run_at, seq LIMIT 1
)
RETURNING job_id, token
"""
RECORD = "INSERT INTO effects (op_key, job_id, result) VALUES (?, ?, ?)"
FINISH = """
UPDATE jobs SET state = 'DONE', done = 1, lease_worker = NULL, lease_expires_at = NULL
WHERE job_id = ? AND token = ?
"""


def connect(path: Path, synchronous: str, *, timeout: float = 5.0) -> sqlite3.Connection:
    """Open ``path`` in WAL mode with ``synchronous``, autocommit (explicit BEGINs)."""
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL").fetchall()
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    for statement in SCHEMA:
        conn.execute(statement)
    return conn


def insert(conn: sqlite3.Connection, rows: list[tuple[str, str, str, str]]) -> None:
    """Insert ``(job_id, kind, identity, payload)`` rows in one transaction."""
    now = time.time()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(INSERT, [(*row, now) for row in rows])
    conn.execute("COMMIT")


def _tx(
    conn: sqlite3.Connection, sql: str, params: tuple[object, ...]
) -> tuple[object, ...] | None:
    """Run one statement in its own ``BEGIN IMMEDIATE`` transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        row: tuple[object, ...] | None = conn.execute(sql, params).fetchone()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return row


def lifecycle(conn: sqlite3.Connection, worker: str = "raw") -> tuple[int, int]:
    """Claim, record one no-op effect for, and finish jobs until none is left.

    Returns ``(jobs processed, busy errors)``; a busy error (the lock not obtained within
    the busy timeout) is counted and the transaction tried again.
    """
    done = busy = 0
    step = 0
    job: tuple[object, ...] | None = None
    while True:
        try:
            if step == 0:
                now = time.time()
                job = _tx(conn, CLAIM, (worker, now + 30.0, now, now))
                if job is None:
                    return done, busy
                step = 1
            assert job is not None
            if step == 1:
                _tx(conn, RECORD, (f"{job[0]}:noop", job[0], "null"))
                step = 2
            _tx(conn, FINISH, (job[0], job[1]))
            step = 0
            done += 1
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            busy += 1
