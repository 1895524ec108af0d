"""Counts of finished jobs for ``stats``, kept by watermark, never on the hot path.

Counting every job by kind and state reads the whole table (about 0.6 s per million
jobs), and keeping a counter per state change would put a write on every lease, advance
and failure, which is what a job ledger's throughput is made of. Instead:

- active jobs are counted from the partial index of active jobs (``jobs_active``), which
  every claim already walks;
- finished jobs up to a watermark (``count_mark.seq``, a job number) are kept as counts
  by kind and state (``state_counts``), except the jobs listed in ``count_pending``:
  those that were still active when the watermark passed them, and those an operator's
  retry made active again. A finished job's kind and state never change (a retry aside),
  so the counts stay true;
- finished jobs past the watermark are counted from the table's tail (a walk of the
  rowid from the watermark), and pending jobs that have finished since are counted by
  looking each one up.

:func:`refresh` moves the watermark forward a bounded step at a time (one short write
transaction each): it adds the step's finished jobs to the counts, lists its active ones
as pending, and folds pending jobs that have finished. ``reconcile`` runs a step after
its pass, and ``stats`` runs steps itself when the tail is long. The two operator paths
that change a counted job keep the counts true in their own transaction: ``retry`` of a
counted failed job takes it out of the counts and lists it as pending, and ``prune``
takes the jobs it deletes out of the counts (or the pending list) and keeps the
watermark at or below the last job, so that a job planned later is always past it.

``stats`` thus reads the active jobs, the tail, the pending list and a few counter rows:
time in proportion to the jobs that are running or recently finished, not to the
ledger's size.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Iterable

from impl.sqlite import queries as q
from impl.sqlite.connection import LedgerConnection, Tx
from model.clock import Clock
from model.errors import DatabaseLocked, DatabaseReadOnly

STEP = 20_000
"""Jobs the watermark passes per refresh transaction: about 50 ms of the write lock here."""
STATS_REFRESH_AT = 20_000
"""``stats`` refreshes first when more jobs than this lie past the watermark."""


def finished_counts(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """Every finished job by kind and state (only the states that have jobs), read in
    the caller's snapshot. The active ones are the caller's (one walk of the partial
    index of active jobs, with the leases: ``queries.ACTIVE_SUMMARY``)."""
    (mark,) = conn.execute(q.SELECT_COUNT_MARK).fetchone()
    out: dict[str, dict[str, int]] = {}
    for sql, params in (
        (q.ROLLUP_COUNTS, {}),
        (q.TAIL_COUNTS, {"mark": mark}),
        (q.PENDING_DONE_COUNTS, {}),
    ):
        for kind, state, n in conn.execute(sql, params):
            by_state = out.setdefault(str(kind), {})
            by_state[str(state)] = by_state.get(str(state), 0) + int(n)
    return out


def behind(conn: sqlite3.Connection) -> int:
    """How many job numbers lie past the watermark (the tail ``stats`` counts by walking)."""
    (mark,) = conn.execute(q.SELECT_COUNT_MARK).fetchone()
    (last,) = conn.execute(q.SELECT_MAX_SEQ).fetchone()
    return max(0, int(last) - int(mark))


def refresh(conn: LedgerConnection, clock: Clock, *, steps: int = 1) -> bool:
    """Move the watermark forward by up to ``steps`` steps of :data:`STEP` jobs, one
    transaction each; return True when it reached the last job."""
    for _ in range(steps):
        with Tx(conn, "rollup", clock):
            (mark,) = conn.execute(q.SELECT_COUNT_MARK).fetchone()
            (last,) = conn.execute(q.SELECT_MAX_SEQ).fetchone()
            upto = min(int(last), int(mark) + STEP)
            params = {"mark": mark, "upto": upto}
            conn.execute(q.FOLD_PENDING_DONE)
            conn.execute(q.DROP_PENDING_DONE)
            if upto > mark:
                conn.execute(q.FOLD_RANGE, params)
                conn.execute(q.PEND_RANGE, params)
                conn.execute(q.SET_COUNT_MARK, params)
        if upto >= int(last):
            return True
    return False


def refresh_for_stats(conn: LedgerConnection, clock: Clock) -> None:
    """Before ``stats`` reads: catch the watermark up when the tail is long. Skipped on a
    database that refuses writes or stays locked (the counts are exact either way; only
    the time to read them grows)."""
    try:
        while behind(conn) > STATS_REFRESH_AT:
            if refresh(conn, clock, steps=1):
                return
    except (DatabaseReadOnly, DatabaseLocked):
        return


def uncount_deleted(conn: sqlite3.Connection, rows: Iterable[tuple[int, str, str]]) -> None:
    """Inside the transaction that deletes the jobs ``rows`` (seq, kind, state): take the
    counted ones out of the counts and the pending ones off the list. Call
    :func:`after_delete` once they are deleted."""
    rows = list(rows)
    if not rows:
        return
    (mark,) = conn.execute(q.SELECT_COUNT_MARK).fetchone()
    seqs = json.dumps([seq for seq, _, _ in rows])
    pending = {int(s) for (s,) in conn.execute(q.SELECT_PENDING_AMONG, {"seqs": seqs})}
    counted = Counter(
        (kind, state) for seq, kind, state in rows if seq <= mark and seq not in pending
    )
    conn.executemany(
        q.UNCOUNT, [{"n": n, "kind": kind, "state": state} for (kind, state), n in counted.items()]
    )
    if pending:
        conn.execute(q.UNPEND_AMONG, {"seqs": seqs})


def after_delete(conn: sqlite3.Connection) -> None:
    """After deleting jobs: keep the watermark at or below the last job."""
    conn.execute(q.LOWER_COUNT_MARK)


def reactivate(conn: sqlite3.Connection, seq: int, kind: str, state: str) -> None:
    """Inside the transaction of an operator's retry of the finished job ``seq`` (in
    ``state``): if it is counted, take it out of the counts and list it as pending."""
    (mark,) = conn.execute(q.SELECT_COUNT_MARK).fetchone()
    if seq > int(mark) or conn.execute(q.IS_PENDING, {"seq": seq}).fetchone() is not None:
        return
    conn.execute(q.UNCOUNT, {"n": 1, "kind": kind, "state": state})
    conn.execute(q.PEND_ONE, {"seq": seq})
