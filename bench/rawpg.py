"""The physical limit on PostgreSQL: a raw ``FOR UPDATE SKIP LOCKED`` claim cycle.

Three durable commits per job (claim, record the effect, finish), with the server's
default ``synchronous_commit = on``, in a schema of its own. The baseline for the
PostgreSQL scaling benchmark.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

SCHEMA = (
    """
    CREATE TABLE jobs (
        seq BIGSERIAL PRIMARY KEY,
        job_id TEXT NOT NULL UNIQUE,
        identity TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'PLANNED',
        active BOOLEAN NOT NULL DEFAULT true,
        run_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        token BIGINT NOT NULL DEFAULT 0,
        lease_worker TEXT,
        lease_expires_at TIMESTAMPTZ
    )
    """,
    "CREATE INDEX jobs_claim ON jobs (run_at, seq) WHERE active",
    """
    CREATE TABLE effects (
        op_key TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        result TEXT NOT NULL
    )
    """,
)

CLAIM = """
UPDATE jobs SET token = token + 1, lease_worker = %s, lease_expires_at = now() + interval '30 s'
WHERE seq = (
    SELECT seq FROM jobs
    WHERE active AND run_at <= now() AND (lease_expires_at IS NULL OR lease_expires_at <= now())
    ORDER BY run_at, seq LIMIT 1 FOR UPDATE SKIP LOCKED
)
RETURNING job_id, token
"""
RECORD = "INSERT INTO effects (op_key, job_id, result) VALUES (%s, %s, 'null')"
FINISH = """
UPDATE jobs SET state = 'DONE', active = false, lease_worker = NULL, lease_expires_at = NULL
WHERE job_id = %s AND token = %s
"""


def _admin(url: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(url, autocommit=True)


def create(url: str, schema: str, jobs: list[tuple[str, str]]) -> None:
    """Create ``schema`` with the raw tables and ``(job_id, identity)`` rows in it."""
    with _admin(url) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        for statement in SCHEMA:
            conn.execute(statement)
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany("INSERT INTO jobs (job_id, identity) VALUES (%s, %s)", jobs)


def drop(url: str, schema: str) -> None:
    """Drop ``schema`` and everything in it."""
    with _admin(url) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def connect(url: str, schema: str) -> psycopg.Connection[tuple[object, ...]]:
    """A connection whose search path is ``schema`` (explicit transactions)."""
    conn = psycopg.connect(url, autocommit=True)
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    return conn


def lifecycle(conn: psycopg.Connection[tuple[object, ...]], worker: str) -> tuple[int, int, int]:
    """Claim, record and finish jobs until none is left; return (done, 0, 0)."""
    done = 0
    while True:
        with conn.transaction():
            row = conn.execute(CLAIM, (worker,)).fetchone()
        if row is None:
            return done, 0, 0
        job_id, token = row
        with conn.transaction():
            conn.execute(RECORD, (f"{job_id}:noop", job_id))
        with conn.transaction():
            conn.execute(FINISH, (job_id, token))
        done += 1
