"""The design floor: jobledger's own SQLite statements, with no API around them.

One job's life through :func:`bench.ledger.lifecycle` is four transactions, each one of
``impl.sqlite.queries``' hot-path statements (claim, effect start, effect result,
advance). :func:`lifecycle` runs exactly those statements, with the same parameters, in
a loop that does nothing else: no validation, no ``Lease`` or context objects, no
telemetry or failpoint checks, no fallback paths. Against the raw-SQL baseline it shows
how much of the gap is the statements and the fourth commit (the floor the API's Python
could at best reach) and how much is the Python around them (the API's distance to this
floor). It is a diagnostic, never a way to use the ledger: it skips every check that
makes the API safe.
"""

from __future__ import annotations

import sqlite3
import time

from impl.sqlite import queries as q
from impl.sqlite.connection import float_text, worker_text
from impl.sqlite.store import SqliteStore
from model.key import op_key

_ADVANCED_DETAIL = '{"from":"PLANNED","to":"DONE"}'


def lifecycle(store: SqliteStore, worker: str = "floor", ttl: float = 30.0) -> int:
    """Claim, start and record one no-op effect for, and finish every job; return how many."""
    conn = store._connection()
    who = worker_text(worker)
    done = 0
    while True:
        conn.execute(q.BEGIN_IMMEDIATE)
        now = time.time()
        granted = conn.execute(
            q.CLAIM_FIRST,
            {
                "worker": worker,
                "expires_at": now + ttl,
                "now": now,
                "at": float_text(now),
                "worker_text": who,
            },
        ).fetchone()
        conn.execute(q.COMMIT)
        if granted is None:
            return done
        job_id, kind, _identity, _payload, state, token, attempts, _length = granted
        key = op_key(job_id, "noop")
        _one(
            conn,
            q.START_EFFECT_FENCED,
            {
                "op_key": key,
                "job_id": job_id,
                "op": "noop",
                "extras": "{}",
                "now": time.time(),
                "token": token,
                "worker": worker,
                "attempt": attempts,
            },
        )
        _one(
            conn,
            q.RECORD_EFFECT,
            {
                "job_id": job_id,
                "op_key": key,
                "result": "null",
                "now": time.time(),
                "token": token,
                "inline": True,
            },
        )
        now = time.time()
        _one(
            conn,
            q.ADVANCE_TO_TERMINAL,
            {
                "state": "DONE",
                "now": now,
                "job_id": job_id,
                "token": token,
                "kind": kind,
                "from_state": state,
                "worker": worker,
                "line": f'[{float_text(now)},"advanced",{token},{who},{_ADVANCED_DETAIL}]\n',
            },
        )
        done += 1


def _one(conn: sqlite3.Connection, sql: str, params: dict[str, object]) -> None:
    """Run ``sql`` in its own write transaction; it must change exactly one row."""
    conn.execute(q.BEGIN_IMMEDIATE)
    changed = conn.execute(sql, params).rowcount
    conn.execute(q.COMMIT)
    if changed != 1:
        raise RuntimeError(f"the floor lifecycle's statement changed {changed} rows: {sql}")
