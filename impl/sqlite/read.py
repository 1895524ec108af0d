"""Read helpers of the SQLite ledger: one job's state, listings, effects and history.

Reads run outside write transactions: each helper is a single statement (an implicit,
consistent read in WAL mode) or a short read snapshot, so they never wait for writers.
"""

from __future__ import annotations

import sqlite3

from impl.sqlite import queries as q
from impl.sqlite.connection import snapshot
from impl.sqlite.row import (
    effect_entries,
    effect_info,
    history_event,
    inline_entries,
    job_row,
    lease_row,
    missing_job,
    planned_entry,
)
from model.breaker import BreakerMove, BreakerRow
from model.errors import InvalidInput
from model.record import EffectInfo, Event, HistoryEvent, JobInfo, LeaseRow


def state(conn: sqlite3.Connection, job_id: str) -> str:
    """Return the job's current state or raise :class:`UnknownJob`."""
    row = conn.execute(q.SELECT_JOB_STATE, (job_id,)).fetchone()
    if row is None:
        raise missing_job(conn, job_id)
    return str(row[0])


def jobs(
    conn: sqlite3.Connection,
    now: float,
    *,
    state: str | None,
    kind: str | None,
    limit: int | None,
    newest_first: bool,
) -> list[JobInfo]:
    """List jobs in planned order (or newest first), filtered by state and kind."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise InvalidInput(f"limit must be an int >= 0 or None, got {limit!r}")
    sql = q.SELECT_JOBS_NEWEST_FIRST if newest_first else q.SELECT_JOBS
    # LIMIT -1 is "no limit"; a limit beyond SQLite's 64-bit integers means the same.
    bound = -1 if limit is None or limit > 2**63 - 1 else limit
    params = {"state": state, "kind": kind, "limit": bound}
    return [job_row(row).info(now) for row in conn.execute(sql, params)]


def leases(conn: sqlite3.Connection, now: float) -> list[LeaseRow]:
    """List the leases that are set, soonest expiry first."""
    return [lease_row(row, now) for row in conn.execute(q.SELECT_LEASES)]


def effects(conn: sqlite3.Connection, job_id: str) -> list[EffectInfo]:
    """List the job's effects in first-start order, or raise :class:`UnknownJob`."""
    with snapshot(conn):
        _require(conn, job_id)
        return effects_in_tx(conn, job_id)


def effects_in_tx(conn: sqlite3.Connection, job_id: str) -> list[EffectInfo]:
    """The job's effects, read in the caller's open transaction."""
    return [effect_info(row) for row in conn.execute(q.SELECT_EFFECTS_OF_JOB, (job_id,))]


def history(conn: sqlite3.Connection, job_id: str) -> list[HistoryEvent]:
    """Return the job's history oldest first, or raise :class:`UnknownJob`.

    The entries are merged by position from the job's row, its effects' rows and the
    history table (see schema version 3).
    """
    with snapshot(conn):
        return history_in_tx(conn, job_id)


def history_in_tx(conn: sqlite3.Connection, job_id: str) -> list[HistoryEvent]:
    """The job's history, read in the caller's open transaction (see :func:`history`)."""
    found = conn.execute(q.SELECT_ROW_HISTORY, (job_id,)).fetchone()
    if found is None:
        raise missing_job(conn, job_id)
    entries = [
        (int(row[0]), history_event(job_id, row[1:]))
        for row in conn.execute(q.SELECT_HISTORY, (job_id,))
    ]
    entries.extend(inline_entries(job_id, str(found[0]), int(found[1])))
    for row in conn.execute(q.SELECT_EFFECT_ENTRIES, (job_id,)):
        entries.extend(effect_entries(job_id, row))
    if not any(event.event is Event.PLANNED for _, event in entries):
        # Planned from schema version 4 on: the first row entry is implied, not stored.
        entries.append((q.HISTORY_GAP, planned_entry(job_id, float(found[2]))))
    entries.sort(key=lambda entry: entry[0])
    return [event for _, event in entries]


def _require(conn: sqlite3.Connection, job_id: str) -> None:
    if conn.execute(q.JOB_EXISTS, (job_id,)).fetchone() is None:
        raise missing_job(conn, job_id)


def breakers(conn: sqlite3.Connection) -> list[BreakerRow]:
    """Every recorded breaker row, by host then worker."""
    return [
        BreakerRow(
            host=str(host),
            worker=str(worker),
            state=BreakerMove(state),
            failures=int(failures),
            last_error=None if last_error is None else str(last_error),
            opened_at=None if opened_at is None else float(opened_at),
            until=None if until is None else float(until),
            changed_at=float(changed_at),
            opens=int(opens),
        )
        for host, worker, state, failures, last_error, opened_at, until, changed_at, opens in (
            conn.execute(q.SELECT_BREAKERS)
        )
    ]
