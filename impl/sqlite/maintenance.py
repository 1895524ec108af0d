"""Maintenance of the SQLite ledger: failing exhausted jobs, reconcile, and stats.

``reconcile`` makes one pass in the order the semantics fix (expire dead leases, mark
their starts in doubt, fail jobs with no attempts left) inside one write transaction;
its dry run counts the same three sets in a read snapshot and writes nothing. ``stats``
reads one snapshot too, so its counts agree with each other.
"""

from __future__ import annotations

import contextlib
import sqlite3

from impl.sqlite import queries as q
from impl.sqlite import rollup
from impl.sqlite.catalog import Catalog
from impl.sqlite.connection import LedgerConnection, Tx, reading, snapshot
from impl.sqlite.row import op_detail, text_of
from model.clock import Clock
from model.errors import DatabaseLocked
from model.record import Event, ReconcileReport, Stats
from model.validate import exhausted_message
from model.workflow import Workflow

_FAILED = Event.FAILED.value
_EXPIRED = Event.EXPIRED.value
_EFFECT_IN_DOUBT = Event.EFFECT_IN_DOUBT.value


def enter_failed(
    tx: Tx,
    workflow: Workflow,
    job_id: str,
    token: int,
    error: str,
    *,
    worker: str | None = None,
) -> None:
    """Move a non-terminal job into its failed state, keeping the token; record FAILED."""
    tx.conn.execute(
        q.ENTER_FAILED,
        {"failed": workflow.failed, "error": error, "now": tx.now, "job_id": job_id},
    )
    tx.history(job_id, _FAILED, token, worker, text_of({"error": error}))


def reconcile(
    conn: LedgerConnection, clock: Clock, catalog: Catalog, *, dry_run: bool = False
) -> ReconcileReport:
    """Run one reconcile pass (or count what it would do) and report the counts."""
    if dry_run:
        return reading(conn, "reconcile", lambda: _would_reconcile(conn, clock))
    with Tx(conn, "reconcile", clock) as tx:
        now = tx.now
        params = {"now": now}
        expired = conn.execute(q.SELECT_EXPIRED_LEASES, params).fetchall()
        conn.executemany(
            q.EXPIRE_LEASE,
            [{"now": now, "job_id": job_id, "token": token} for job_id, token, _ in expired],
        )
        for job_id, token, worker in expired:
            tx.history(job_id, _EXPIRED, token, worker)
        starts = conn.execute(q.SELECT_DEAD_STARTS, params).fetchall()
        conn.executemany(
            q.MARK_START_IN_DOUBT,
            [
                {"job_id": job_id, "op_key": key, "token": token}
                for key, job_id, _, token, _, _ in starts
            ],
        )
        for _, job_id, op, _, by, job_token in starts:
            tx.history(job_id, _EFFECT_IN_DOUBT, job_token, by, op_detail(op))
        exhausted = conn.execute(q.SELECT_EXHAUSTED, params).fetchall()
        for job_id, kind, token, attempts, max_attempts in exhausted:
            enter_failed(
                tx,
                catalog.get(conn, kind),
                job_id,
                token,
                exhausted_message(attempts, max_attempts),
            )
    # Maintenance beside the pass (its own short transaction, invisible to callers): a
    # step that cannot get the write lock in time is left to the next pass.
    with contextlib.suppress(DatabaseLocked):
        rollup.refresh(conn, clock)
    return ReconcileReport(
        leases_expired=len(expired), effects_in_doubt=len(starts), jobs_failed=len(exhausted)
    )


def _would_reconcile(conn: sqlite3.Connection, clock: Clock) -> ReconcileReport:
    with snapshot(conn):
        params = {"now": clock()}
        return ReconcileReport(
            leases_expired=_count(conn, q.COUNT_EXPIRED_LEASES, params),
            effects_in_doubt=_count(conn, q.COUNT_DEAD_STARTS, params),
            jobs_failed=_count(conn, q.COUNT_EXHAUSTED, params),
        )


def stats(conn: LedgerConnection, clock: Clock, catalog: Catalog) -> Stats:
    """Return counts by kind and state, leases, in-doubt effects and queue lag.

    The counts come from :mod:`impl.sqlite.rollup` (time in proportion to the active and
    recently finished jobs); a long tail past its watermark is folded in first."""
    rollup.refresh_for_stats(conn, clock)
    return reading(conn, "stats", lambda: _stats(conn, clock, catalog))


def _stats(conn: sqlite3.Connection, clock: Clock, catalog: Catalog) -> Stats:
    with snapshot(conn):
        now = clock()
        params = {"now": now}
        workflows = catalog.all(conn)
        by_state = {w.name: dict.fromkeys(w.states, 0) for w in workflows}
        for kind, states in rollup.finished_counts(conn).items():
            by_state.setdefault(kind, {}).update(states)
        live = expired = 0
        oldest: float | None = None
        for kind, state, n, n_live, n_expired, first in conn.execute(q.ACTIVE_SUMMARY, params):
            counts = by_state.setdefault(str(kind), {})
            counts[str(state)] = counts.get(str(state), 0) + int(n)
            live += int(n_live)
            expired += int(n_expired)
            if first is not None and (oldest is None or float(first) < oldest):
                oldest = float(first)
        return Stats(
            by_state=by_state,
            leases_live=live,
            leases_expired=expired,
            in_doubt=_count(conn, q.COUNT_IN_DOUBT_MARKED, params)
            + (_count(conn, q.COUNT_DEAD_STARTS_EXPIRED, params) if expired else 0),
            failed=sum(by_state[w.name][w.failed] for w in workflows),
            oldest_eligible_age=None if oldest is None else now - oldest,
        )


def _count(conn: sqlite3.Connection, sql: str, params: dict[str, float]) -> int:
    return int(conn.execute(sql, params).fetchone()[0])
