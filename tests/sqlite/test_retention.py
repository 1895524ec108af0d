"""SQLite gives the space a prune frees back to the file system.

New files are created with ``auto_vacuum = INCREMENTAL``, so after a prune the free pages
are released (incremental vacuum, a chunk per short transaction) and the WAL is
checkpointed and truncated: the file on disk shrinks. A file created without it keeps
its free pages (reused by later inserts) until the documented one-time ``VACUUM``.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from impl.pacing import LONGEST_PAUSE, Pacer
from impl.sqlite import retention
from impl.sqlite.store import SqliteStore
from model import ManualClock, Plan, Workflow
from model.retention import PrunedJob

FLOW = Workflow(name="f", states=["A", "B"], transitions=[("A", "B")], initial="A", terminal=["B"])
JOBS = 3000


def _pages(path: Path) -> tuple[int, int, int]:
    """(page_count, freelist_count, auto_vacuum) as a fresh connection reads them."""
    with closing(sqlite3.connect(path)) as conn:
        return (
            int(conn.execute("PRAGMA page_count").fetchone()[0]),
            int(conn.execute("PRAGMA freelist_count").fetchone()[0]),
            int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]),
        )


def _fill_and_finish(store: SqliteStore, clock: ManualClock) -> None:
    store.register(FLOW)
    big = "x" * 400
    store.plan_many("f", [Plan({"n": n}, payload={"blob": big}) for n in range(JOBS)])
    while (lease := store.lease_next("w")) is not None:
        store.run_effect(lease, "e", lambda ctx: {"blob": big})
        store.advance(lease, "B")
    clock.advance(10)


def test_a_prune_gives_the_pages_back_and_the_file_shrinks(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    clock = ManualClock()
    with SqliteStore(path, clock=clock) as store:
        _fill_and_finish(store, clock)
        full, _, mode = _pages(path)
        assert mode == 2, "a new file is created with auto_vacuum = INCREMENTAL"
        store.prune(finished_before=clock(), batch_size=500)
        pages, free, _ = _pages(path)
        assert free == 0
        assert pages < full / 10, (pages, full)
        # The WAL was checkpointed into the file and truncated, and the file shrank.
        wal = path.with_name(path.name + "-wal")
        assert not wal.exists() or wal.stat().st_size == 0
        assert path.stat().st_size == pages * 2048


def test_an_older_file_keeps_its_free_pages_until_a_vacuum(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with closing(sqlite3.connect(path)) as conn:
        # A file created before retention: its first table exists without auto_vacuum.
        conn.execute("CREATE TABLE placeholder (x)")
    clock = ManualClock()
    with SqliteStore(path, clock=clock) as store:
        _fill_and_finish(store, clock)
        store.prune(finished_before=clock())
        pages, free, mode = _pages(path)
        assert mode == 0
        assert free > pages / 2
    # The documented one-time step (specs/009-retention.md), with no store open.
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")
    after, free_after, mode_after = _pages(path)
    assert (mode_after, free_after) == (2, 0)
    assert after < pages / 2
    with SqliteStore(path, clock=clock) as store:
        _fill_and_finish_more(store, clock)
        store.prune(finished_before=clock())
    assert _pages(path)[1] == 0


def _fill_and_finish_more(store: SqliteStore, clock: ManualClock) -> None:
    big = "y" * 400
    store.plan_many("f", [Plan({"m": n}, payload={"blob": big}) for n in range(500)])
    while (lease := store.lease_next("w")) is not None:
        store.advance(lease, "B")
    clock.advance(10)


class _Time:
    """A clock the test moves by hand, and a sleep that only notes how long it was asked."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


PACED_JOBS = 600


def _fill_quickly(store: SqliteStore, clock: ManualClock) -> None:
    store.register(FLOW)
    big = "z" * 1500
    store.plan_many("f", [Plan({"n": n}, payload={"blob": big}) for n in range(PACED_JOBS)])
    while (lease := store.lease_next("w")) is not None:
        store.advance(lease, "B")
    clock.advance(10)


def _prune_paced(
    store: SqliteStore, clock: ManualClock, pacer: Pacer, time_: _Time, cost: float
) -> int:
    """Prune every finished job with ``pacer``; the archive callback (which runs while the
    batch holds the write lock) moves the pacer's clock ``cost`` seconds per job."""

    def archive(jobs: list[PrunedJob]) -> None:
        time_.now += cost * len(jobs)

    report = retention.prune(
        store._connection(),
        clock,
        finished_before=clock(),
        keep_failed=False,
        forget_keys=False,
        dry_run=False,
        batch_size=200,
        limit=None,
        archive=archive,
        progress=None,
        pacer=pacer,
    )
    return report.jobs


def test_after_each_prune_batch_the_lock_is_left_free_for_most_of_the_time(
    tmp_path: Path,
) -> None:
    # Each job costs 0.1 ms of lock time here (the archive runs while the batch holds the
    # lock). After each batch the prune sleeps (1 - share) / share times its hold, so it
    # holds the lock at most `share` of the time; every batch keeps the model's size.
    clock = ManualClock()
    time_ = _Time()
    pacer = Pacer(limit=200, floor=200, monotonic=time_.monotonic, sleep=time_.sleep)
    with SqliteStore(tmp_path / "jobs.sqlite", clock=clock) as store:
        _fill_quickly(store, clock)
        assert _prune_paced(store, clock, pacer, time_, cost=0.0001) == PACED_JOBS
    steps = pacer.steps
    assert [s.items for s in steps] == [200, 200, 200]
    assert [s.seconds for s in steps] == pytest.approx([0.02, 0.02, 0.02])
    assert time_.slept == [s.pause for s in steps]
    for s in steps:
        assert s.pause == pytest.approx(
            min(s.seconds * (1 - pacer.share) / pacer.share, LONGEST_PAUSE)
        )
    held = sum(s.seconds for s in steps)
    assert held / (held + sum(time_.slept)) <= pacer.share + 1e-9


def test_a_prune_by_default_takes_batch_size_jobs_per_batch_however_long_they_hold(
    tmp_path: Path,
) -> None:
    # The model's batches (MemoryStore.prune) are batch_size jobs each: pacing must not
    # change them, or a crash mid-prune would leave other jobs behind than it predicts.
    clock = ManualClock()
    with SqliteStore(tmp_path / "jobs.sqlite", clock=clock) as store:
        _fill_quickly(store, clock)
        seen: list[int] = []
        report = store.prune(
            finished_before=clock(), batch_size=250, archive=lambda jobs: seen.append(len(jobs))
        )
    assert report.jobs == PACED_JOBS
    assert seen == [250, 250, 100]


def test_the_vacuum_after_a_prune_frees_many_pages_per_transaction(tmp_path: Path) -> None:
    # Python's sqlite3 steps "PRAGMA incremental_vacuum(N)" once per execute, which frees
    # one page: each chunk must run the pragma once per page (it once freed one page per
    # transaction, thousands of transactions after a big prune).
    clock = ManualClock()
    with SqliteStore(tmp_path / "jobs.sqlite", clock=clock) as store:
        _fill_quickly(store, clock)
        conn = store._connection()
        time_ = _Time()
        pruner = Pacer(limit=500, monotonic=time_.monotonic, sleep=time_.sleep)
        _prune_paced(store, clock, pruner, time_, cost=0.0)
        free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        assert free > 200
        vacuum = Pacer(limit=1024, first=64, monotonic=time_.monotonic, sleep=time_.sleep)
        assert retention.reclaim(conn, clock, vacuum) == free
    assert vacuum.steps[0].items == 64
    assert sum(s.items for s in vacuum.steps) == free
    assert _pages(tmp_path / "jobs.sqlite")[1] == 0
