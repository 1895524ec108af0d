"""``prune`` on PostgreSQL: removing finished jobs in short batches.

Each batch is found in its own snapshot (a walk of the ``seq`` index from where the last
batch ended) and then removed in one transaction that locks the batch's rows that are
still prunable (``FOR UPDATE``: an operator's retry or cancel of one of them waits for
the batch, or the batch skips it), hands them to the archive callback, and deletes their
effects, history and rows, writing their tombstones. Only the batch's rows are locked, so
workers claiming and finishing other jobs never wait for a prune. Deleting in batches of
a few hundred rows lets autovacuum (tuned to start at 5% dead rows, schema version 2)
reclaim the space while the prune goes on.

A transaction the server asks to re-run (a lost connection before the body ran) runs the
archive callback again for the same jobs: an archive may then hold a job twice, never
lose one.
"""

from __future__ import annotations

from attrs import define, field
from psycopg.rows import DictRow

from impl import failpoint
from impl.postgres import queries as q
from impl.postgres import rollup
from impl.postgres.database import Database, Tx
from impl.postgres.rows import effect_info, history_event, job_info
from model.retention import (
    ArchiveFn,
    ProgressFn,
    PrunedJob,
    PruneReport,
    check_batch_size,
    check_limit,
)

_NO_LIMIT = None  # PostgreSQL's LIMIT NULL: no limit

Params = dict[str, object]


def prune(
    db: Database,
    *,
    finished_before: float,
    keep_failed: bool,
    forget_keys: bool,
    dry_run: bool,
    batch_size: int,
    limit: int | None,
    archive: ArchiveFn | None,
    progress: ProgressFn | None,
) -> PruneReport:
    """Prune as :meth:`model.memory.MemoryStore.prune` decides; see the module docstring."""
    size = check_batch_size(batch_size)
    cap = check_limit(limit)
    where: Params = {"cutoff": finished_before, "keep_failed": bool(keep_failed)}
    if dry_run:
        return db.read("prune", lambda tx: _would_prune(tx, where, cap, forget_keys))
    run = _Pruning(db, where, forget_keys, archive, progress)
    after: object = 0
    while cap is None or run.report.jobs < cap:
        n = size if cap is None else min(size, cap - run.report.jobs)
        seqs = run.next_batch(q.PRUNABLE, after, n, "seq")
        if not seqs:
            break
        after = seqs[-1]
        run.prune_batch(seqs)
    if forget_keys and cap is None:
        ids: list[object] = [""]
        while ids:
            ids = run.next_batch(q.FORGETTABLE, ids[-1], size, "job_id")
            if ids:
                run.forget_batch(ids)
    return run.report


@define
class _Pruning:
    """One prune call's database, conditions, callbacks and running totals."""

    db: Database
    where: Params
    forget_keys: bool
    archive: ArchiveFn | None
    progress: ProgressFn | None
    report: PruneReport = field(factory=PruneReport)

    def next_batch(self, sql: str, after: object, n: int, column: str) -> list[object]:
        """The next batch's keys after ``after``, read in a snapshot of their own."""
        params = {**self.where, "after": after, "n": n}
        return self.db.read("prune", lambda tx: [r[column] for r in tx.all(sql, params)])

    def prune_batch(self, seqs: list[object]) -> None:
        """Remove the jobs of ``seqs`` that are still prunable, in one transaction."""

        def body(tx: Tx) -> tuple[int, int]:
            rollup.hold(tx)
            rows = tx.all(q.PRUNE_LOCK, {**self.where, "seqs": seqs})
            if not rows:
                return 0, 0
            rollup.uncount_deleted(tx, [(r["seq"], r["kind"], r["state"]) for r in rows])
            ids = {"ids": [r["job_id"] for r in rows]}
            if self.archive is not None:
                now = tx.now
                self.archive([_pruned(tx, r, now) for r in rows])
                failpoint.hit("prune.after_archive")
            effects = tx.run(q.PRUNE_EFFECTS, ids)
            tx.run(q.PRUNE_HISTORY, ids)
            if not self.forget_keys:
                tx.run(q.INSERT_TOMBSTONES, ids)
            tx.run(q.PRUNE_JOBS, ids)
            return len(rows), effects

        jobs, effects = self.db.write("prune", body)
        if jobs:
            self._add(
                self.report.plus(
                    jobs=jobs, effects=effects, tombstones=0 if self.forget_keys else jobs
                )
            )

    def forget_batch(self, ids: list[object]) -> None:
        """Remove the tombstones of ``ids`` that are still forgettable, in one transaction."""
        params = {**self.where, "ids": ids}
        gone = self.db.write("prune", lambda tx: tx.run(q.FORGET, params))
        if gone:
            self._add(self.report.plus(forgotten=gone))

    def _add(self, report: PruneReport) -> None:
        self.report = report
        if self.progress is not None:
            self.progress(report)


def _pruned(tx: Tx, row: DictRow, now: float) -> PrunedJob:
    params = {"job_id": row["job_id"]}
    return PrunedJob(
        job=job_info(row, now),
        effects=tuple(effect_info(r) for r in tx.all(q.EFFECTS, params)),
        history=tuple(history_event(r) for r in tx.all(q.HISTORY, params)),
    )


def _would_prune(tx: Tx, where: Params, cap: int | None, forget_keys: bool) -> PruneReport:
    found = tx.one(q.COUNT_PRUNABLE, {**where, "n": cap})
    assert found is not None
    jobs = int(found["jobs"])
    forgotten = 0
    if forget_keys and cap is None:
        row = tx.one(q.COUNT_FORGETTABLE, where)
        assert row is not None
        forgotten = int(row["n"])
    return PruneReport(
        jobs=jobs,
        effects=int(found["effects"]),
        tombstones=0 if forget_keys else jobs,
        forgotten=forgotten,
    )
