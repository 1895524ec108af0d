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

from impl.sqlite.store import SqliteStore
from model import ManualClock, Plan, Workflow

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
