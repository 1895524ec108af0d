"""Counts of finished jobs for ``stats`` on PostgreSQL, kept by watermark.

The same scheme as SQLite's (see :mod:`impl.sqlite.rollup`): active jobs are counted
from the ``(kind, state)`` index (an index-only scan of each workflow's active states),
finished jobs up to the watermark ``count_mark.seq`` from ``state_counts`` (except those
in ``count_pending``), the rest from the table's tail past the watermark and from the
pending list. Nothing is written on the hot path.

What PostgreSQL adds is concurrency: a job numbered below the watermark must never commit
after the watermark passed it, and a counted job must not change while a refresh reads.
Every transaction that numbers a new job (``plan``), retries a finished one or deletes
some (``prune``) holds a shared advisory lock (``queries.COUNTS_LOCK_SHARED``); a refresh
step takes it exclusively, so it waits for those in flight and holds new ones off for its
few milliseconds, and reads the highest job number only then. Each refresh statement
reads one snapshot, so a job that finishes meanwhile is either counted or pending, never
neither. Workers' own transactions (leases, advances, failures) take no lock: a job
finishing behind the watermark is found through the pending list.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from impl.postgres import queries as q
from impl.postgres.database import Database, Tx
from model.errors import DatabaseLocked, DatabaseReadOnly
from model.workflow import Workflow

STEP = 20_000
"""Jobs the watermark passes per refresh transaction."""
STATS_REFRESH_AT = 20_000
"""``stats`` refreshes first when more job numbers than this lie past the watermark."""


def _one(tx: Tx, sql: str, params: dict[str, object] | None = None) -> int:
    row = tx.one(sql, params or {})
    assert row is not None
    return int(row["seq"])


def counts(tx: Tx, flows: Iterable[Workflow]) -> tuple[dict[str, dict[str, int]], float | None]:
    """Every job by kind and state (the states that have jobs), and the run_at of the
    oldest eligible job (None if none), in ``tx``'s snapshot; ``flows`` are the stored
    workflows (a job's kind is always one: the guard trigger checks it)."""
    mark = _one(tx, q.COUNT_MARK)
    out: dict[str, dict[str, int]] = {}
    rows = [
        row
        for flow in flows
        for row in tx.all(
            q.ACTIVE_COUNTS,
            {"kind": flow.name, "states": [s for s in flow.states if s not in flow.terminal]},
        )
    ]
    for sql in (q.ROLLUP_COUNTS, q.TAIL_COUNTS, q.PENDING_DONE_COUNTS):
        rows += tx.all(sql, {"mark": mark})
    for row in rows:
        by_state = out.setdefault(row["kind"], {})
        by_state[row["state"]] = by_state.get(row["state"], 0) + int(row["n"])
    first = tx.one(q.OLDEST_ELIGIBLE, {"now": tx.now})
    oldest = None if first is None or first["oldest"] is None else float(first["oldest"])
    return out, oldest


def behind(tx: Tx) -> int:
    """How many job numbers lie past the watermark."""
    return max(0, _one(tx, q.MAX_SEQ) - _one(tx, q.COUNT_MARK))


def refresh(db: Database) -> bool:
    """One step: move the watermark forward by up to :data:`STEP` jobs; return True when
    it reached the last job."""

    def body(tx: Tx) -> bool:
        tx.one(q.COUNTS_LOCK)
        mark = _one(tx, q.COUNT_MARK_FOR_UPDATE)
        last = _one(tx, q.MAX_SEQ)
        upto = min(last, mark + STEP)
        tx.run(q.FOLD_PENDING_DONE)
        if upto > mark:
            params = {"mark": mark, "upto": upto}
            tx.run(q.FOLD_RANGE, params)
            tx.run(q.SET_COUNT_MARK, params)
        return upto >= last

    return db.write("rollup", body, failpoints=False)


def refresh_for_stats(db: Database) -> None:
    """Before ``stats`` reads: catch the watermark up when the tail is long (skipped on a
    server that refuses writes or a lock held past the busy timeout)."""
    try:
        while db.read("stats", behind) > STATS_REFRESH_AT:
            if refresh(db):
                return
    except (DatabaseReadOnly, DatabaseLocked):
        return


def hold(tx: Tx) -> None:
    """Take the shared counts lock in ``tx`` (before it numbers, retries or deletes jobs)."""
    tx.one(q.COUNTS_LOCK_SHARED)


def uncount_deleted(tx: Tx, rows: Iterable[tuple[int, str, str]]) -> None:
    """In the transaction that deletes the jobs ``rows`` (seq, kind, state), holding the
    shared lock: take the counted ones out of the counts, the pending ones off the list."""
    rows = list(rows)
    if not rows:
        return
    mark = _one(tx, q.COUNT_MARK)
    seqs = [seq for seq, _, _ in rows]
    pending = {int(r["seq"]) for r in tx.all(q.PENDING_AMONG, {"seqs": seqs})}
    counted = Counter(
        (kind, state) for seq, kind, state in rows if seq <= mark and seq not in pending
    )
    for (kind, state), n in counted.items():
        tx.run(q.UNCOUNT, {"n": n, "kind": kind, "state": state})
    if pending:
        tx.run(q.UNPEND_AMONG, {"seqs": seqs})


def reactivate(tx: Tx, seq: int, kind: str, state: str) -> None:
    """In an operator's retry of the finished job ``seq``, holding the shared lock: if it
    is counted, take it out of the counts and list it as pending."""
    if seq > _one(tx, q.COUNT_MARK) or tx.all(q.PENDING_AMONG, {"seqs": [seq]}):
        return
    tx.run(q.UNCOUNT, {"n": 1, "kind": kind, "state": state})
    tx.run(q.PEND_ONE, {"seq": seq})
