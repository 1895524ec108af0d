"""``prune`` on SQLite: removing finished jobs in short batches, and giving space back.

Each batch is found without the write lock (a walk of the rowid from where the last
batch ended, so the whole prune reads the table once) and then removed in its own
``BEGIN IMMEDIATE`` transaction, which reads the batch's rows again by seq and removes
only those still prunable (an operator may have retried one meanwhile). Inside it, the
archive callback gets the batch's jobs (what ``show --json`` prints) and must have made
them durable before it returns: the delete commits after it, never before.

Batches are paced (:class:`impl.pacing.Pacer`): after each, the prune leaves the lock
free for (1 - ``pacing.SHARE``) / ``pacing.SHARE`` times as long as the batch held it
(timed from the lock being held to the commit), so the prune holds the lock at most 30%
of the time however long it runs. Each batch takes exactly ``batch_size`` jobs, as
:meth:`model.memory.MemoryStore.prune` defines (its batch boundaries are what a crash in
the middle of a prune leaves behind): sizing batches to a lock-time budget instead would
need the model to say "at most ``batch_size``" first.

After a prune, the free pages go back to the file system by incremental vacuum (files
created with ``auto_vacuum = INCREMENTAL``, every file created by this version) in
chunks paced the same way (at most ``queries.VACUUM_CHUNK_PAGES`` pages per
transaction), and the WAL is checkpointed so the file itself shrinks (:func:`reclaim`):
first passively (copying the WAL without holding writers up), then truncated.
"""

from __future__ import annotations

import json
import sqlite3
import time

from attrs import define, field

from impl import failpoint
from impl.pacing import Pacer
from impl.sqlite import queries as q
from impl.sqlite import rollup
from impl.sqlite.connection import LedgerConnection, Tx, reading, snapshot
from impl.sqlite.read import effects_in_tx, history_in_tx
from impl.sqlite.row import JobRow, job_row
from impl.sqlite.waiting import is_busy
from model.clock import Clock
from model.retention import (
    ArchiveFn,
    ProgressFn,
    PrunedJob,
    PruneReport,
    check_batch_size,
    check_limit,
)

_NO_LIMIT = -1  # SQLite's LIMIT -1: no limit
CHECKPOINT_RETRY = 0.01
"""Seconds between two tries of the checkpoint after a prune."""
FIRST_VACUUM_CHUNK = 64
"""Pages the first incremental vacuum transaction frees (later ones are paced)."""
CHECKPOINT_PATIENCE = 1.0
"""Seconds the checkpoint after a prune is tried for."""

Params = dict[str, object]


def prune(
    conn: LedgerConnection,
    clock: Clock,
    *,
    finished_before: float,
    keep_failed: bool,
    forget_keys: bool,
    dry_run: bool,
    batch_size: int,
    limit: int | None,
    archive: ArchiveFn | None,
    progress: ProgressFn | None,
    pacer: Pacer | None = None,
) -> PruneReport:
    """Prune as :meth:`model.memory.MemoryStore.prune` decides; see the module docstring.

    ``pacer`` paces the batches (default: a :class:`Pacer` that keeps every batch at
    ``batch_size``).
    """
    size = check_batch_size(batch_size)
    cap = check_limit(limit)
    where: Params = {"cutoff": finished_before, "keep_failed": bool(keep_failed)}
    if dry_run:
        return reading(conn, "prune", lambda: _would_prune(conn, where, cap, forget_keys))
    pace = Pacer(limit=size, floor=size) if pacer is None else pacer
    run = _Pruning(conn, clock, where, forget_keys, archive, progress, pace)
    after = 0
    while cap is None or run.report.jobs < cap:
        n = pace.size if cap is None else min(pace.size, cap - run.report.jobs)
        seqs = run.next_batch(q.SELECT_PRUNABLE, after, n)
        if not seqs:
            break
        after = int(seqs[-1])  # type: ignore[call-overload]
        run.prune_batch(seqs)
    if forget_keys and cap is None:
        ids: list[object] = [""]
        while ids:
            ids = run.next_batch(q.SELECT_FORGETTABLE, ids[-1], pace.size)
            if ids:
                run.forget_batch(ids)
    return run.report


@define
class _Pruning:
    """One prune call's connection, conditions, callbacks and running totals."""

    conn: LedgerConnection
    clock: Clock
    where: Params
    forget_keys: bool
    archive: ArchiveFn | None
    progress: ProgressFn | None
    pacer: Pacer
    report: PruneReport = field(factory=PruneReport)

    def next_batch(self, sql: str, after: object, n: int) -> list[object]:
        """The next batch's keys after ``after``, read without the write lock."""
        params = {**self.where, "after": after, "n": n}
        return reading(
            self.conn, "prune", lambda: [row[0] for row in self.conn.execute(sql, params)]
        )

    def prune_batch(self, seqs: list[object]) -> None:
        """Remove the jobs of ``seqs`` that are still prunable, in one transaction (paced:
        the pacer times it from the moment the write lock is held to the commit)."""
        conn = self.conn
        effects = 0
        with Tx(conn, "prune", self.clock) as tx:
            started = self.pacer.start()
            params = {**self.where, "seqs": json.dumps(seqs)}
            if self.archive is not None:
                rows = [job_row(r) for r in conn.execute(q.SELECT_PRUNE_ROWS, params)]
                batch = [(r.seq, r.job_id, r.kind, r.state) for r in rows]
                if rows:
                    self.archive([_pruned(conn, r, tx.now) for r in rows])
                    if failpoint.ARMED:
                        failpoint.hit("prune.after_archive")
            else:
                batch = [
                    (int(s), str(j), str(k), str(st))
                    for s, j, k, st in conn.execute(q.SELECT_PRUNE_BATCH, params)
                ]
            if batch:
                effects = self._delete(batch, tx.now)
        jobs = len(batch)
        self.pacer.done(started, jobs)  # after the commit: the pause leaves the lock free
        if not batch:
            return
        self._add(
            self.report.plus(jobs=jobs, effects=effects, tombstones=0 if self.forget_keys else jobs)
        )

    def _delete(self, batch: list[tuple[int, str, str, str]], now: float) -> int:
        """Delete ``batch`` (seq, job_id, kind, state) in the open transaction; return the
        number of effects deleted."""
        conn = self.conn
        live = {"seqs": json.dumps([b[0] for b in batch])}
        ids = {"ids": json.dumps([b[1] for b in batch])}
        rollup.uncount_deleted(conn, [(b[0], b[2], b[3]) for b in batch])
        effects = int(conn.execute(q.DELETE_PRUNED_EFFECTS, ids).rowcount)
        conn.execute(q.DELETE_PRUNED_HISTORY, ids)
        if not self.forget_keys:
            conn.execute(q.INSERT_TOMBSTONES, {**live, "now": now})
        conn.execute(q.DELETE_PRUNED_JOBS, live)
        rollup.after_delete(conn)
        return effects

    def forget_batch(self, ids: list[object]) -> None:
        """Remove the tombstones of ``ids`` that are still forgettable, in one transaction."""
        with Tx(self.conn, "prune", self.clock):
            started = self.pacer.start()
            gone = self.conn.execute(
                q.DELETE_TOMBSTONES, {**self.where, "ids": json.dumps(ids)}
            ).rowcount
        self.pacer.done(started, len(ids))
        if gone:
            self._add(self.report.plus(forgotten=gone))

    def _add(self, report: PruneReport) -> None:
        self.report = report
        if self.progress is not None:
            self.progress(report)


def _pruned(conn: sqlite3.Connection, row: JobRow, now: float) -> PrunedJob:
    return PrunedJob(
        job=row.info(now),
        effects=tuple(effects_in_tx(conn, row.job_id)),
        history=tuple(history_in_tx(conn, row.job_id)),
    )


def _would_prune(
    conn: sqlite3.Connection, where: Params, cap: int | None, forget_keys: bool
) -> PruneReport:
    with snapshot(conn):
        n = _NO_LIMIT if cap is None else cap
        jobs, effects = conn.execute(q.COUNT_PRUNABLE, {**where, "n": n}).fetchone()
        forgotten = (
            int(conn.execute(q.COUNT_FORGETTABLE, where).fetchone()[0])
            if forget_keys and cap is None
            else 0
        )
    return PruneReport(
        jobs=int(jobs),
        effects=int(effects),
        tombstones=0 if forget_keys else int(jobs),
        forgotten=forgotten,
    )


def reclaim(conn: LedgerConnection, clock: Clock, pacer: Pacer | None = None) -> int:
    """Give the file's free pages back to the file system; return how many were freed.

    Runs only on files with ``auto_vacuum = INCREMENTAL``: each chunk is one short write
    transaction, sized and paced by ``pacer`` (default: chunks of at most
    ``queries.VACUUM_CHUNK_PAGES`` pages, the first of :data:`FIRST_VACUUM_CHUNK`). Then
    the WAL is checkpointed and truncated so the main file shrinks; a checkpoint that
    meets a busy reader is left to the next one (nothing is lost, the file shrinks later).
    """
    mode = reading(conn, "reclaim", lambda: int(conn.execute(q.PRAGMA_AUTO_VACUUM).fetchone()[0]))
    if mode != 2:  # 2 = INCREMENTAL
        return 0
    pace = Pacer(limit=q.VACUUM_CHUNK_PAGES, first=FIRST_VACUUM_CHUNK) if pacer is None else pacer
    freed = 0
    while True:
        with Tx(conn, "vacuum", clock):
            started = pace.start()
            before = int(conn.execute(q.PRAGMA_FREELIST_COUNT).fetchone()[0])
            if before == 0:
                break
            conn.executemany(q.INCREMENTAL_VACUUM_PAGE, [()] * min(pace.size, before))
            after = int(conn.execute(q.PRAGMA_FREELIST_COUNT).fetchone()[0])
        freed += before - after
        pace.done(started, before - after)
        if after >= before:  # pragma: no cover - nothing movable: stop rather than spin
            break
    _checkpoint_truncate(conn)
    return freed


def _checkpoint_truncate(conn: LedgerConnection) -> None:
    """Copy the WAL into the file and truncate it, so the file's shrinking reaches the
    disk. Tried again for up to the connection's wait limit while a reader or the
    store's background checkpoint holds it up (at most :data:`CHECKPOINT_PATIENCE`, since
    each try holds the writers up a moment); then left to the next checkpoint."""
    # A passive checkpoint copies the WAL without holding writers up; the truncating one
    # after it (which does hold them up while it copies) then has little left to copy.
    try:
        conn.execute(q.CHECKPOINT_PASSIVE).fetchall()
    except sqlite3.OperationalError as exc:
        if not is_busy(exc):
            raise
    deadline = time.monotonic() + min(conn.wait_limit, CHECKPOINT_PATIENCE)
    while True:
        try:
            busy = int(conn.execute(q.CHECKPOINT_TRUNCATE).fetchone()[0])
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
            busy = 1
        if not busy or time.monotonic() >= deadline:
            return
        time.sleep(CHECKPOINT_RETRY)
