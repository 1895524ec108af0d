"""Storage faults injected without a custom VFS: each surfaces as a typed error and leaves
the database intact (SQLite's own I/O-error testing, scaled down to what a test can do)."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from impl.sqlite.store import SqliteStore
from model import (
    Config,
    DatabaseCorrupt,
    DatabaseFull,
    DatabaseLocked,
    DatabaseReadOnly,
    StorageError,
)


def _integrity(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def test_a_file_that_is_not_a_database_is_corrupt_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sqlite"
    garbage = bytes(range(256)) * 64
    path.write_bytes(garbage)
    with pytest.raises(DatabaseCorrupt, match="not a jobledger database"):
        SqliteStore(path)
    assert path.read_bytes() == garbage
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.sqlite"]


def test_disk_full_is_typed_and_keeps_what_was_committed(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with SqliteStore(path) as store:
        kept = [store.plan("download", {"url": f"u{i}"}) for i in range(5)]
        conn = store._connection()
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 2}")
        with pytest.raises(DatabaseFull):  # noqa: PT012 (the loop is what fills the file)
            for i in range(1000):
                store.plan("download", {"url": f"big{i}"}, payload="x" * 4000)
        assert [store.state(j) for j in kept] == ["PLANNED"] * 5
        planned = {j.job_id for j in store.jobs()}
        assert set(kept) <= planned
        assert not conn.in_transaction
    assert _integrity(path) == "ok"
    with SqliteStore(path) as again:
        assert {j.job_id for j in again.jobs()} == planned


def test_a_read_only_connection_is_typed(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "db.sqlite") as store:
        job_id = store.plan("download", {"url": "u"})
        store._connection().execute("PRAGMA query_only = ON")
        with pytest.raises(DatabaseReadOnly):
            store.plan("download", {"url": "v"})
        with pytest.raises(DatabaseReadOnly):
            store.lease_next("w")
        assert [j.job_id for j in store.jobs()] == [job_id]
        assert store.job(job_id).token == 0
        store._connection().execute("PRAGMA query_only = OFF")
        assert store.lease_next("w") is not None


def test_an_interrupted_statement_is_a_storage_error_and_writes_nothing(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "db.sqlite") as store:
        conn = store._connection()
        conn.set_progress_handler(lambda: 1, 1)
        with pytest.raises(StorageError, match="interrupted") as info:
            store.plan("download", {"url": "u"})
        assert type(info.value) is StorageError
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        conn.set_progress_handler(None, 1)
        assert not conn.in_transaction
        assert store.jobs() == []
        assert store.state(store.plan("download", {"url": "u"})) == "PLANNED"


def test_locked_past_the_busy_timeout_is_typed_and_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with SqliteStore(path, config=Config(busy_timeout=0.2)) as store:
        first = store.plan("download", {"url": "a"})
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            started = time.monotonic()
            with pytest.raises(DatabaseLocked, match="busy timeout"):
                store.plan("download", {"url": "b"})
            assert time.monotonic() - started >= 0.15, "the busy timeout was not waited"
            assert store.state(first) == "PLANNED"  # reads go on under a writer (WAL)
        finally:
            other.execute("ROLLBACK")
            other.close()
        second = store.plan("download", {"url": "b"})
        assert [j.job_id for j in store.jobs()] == [first, second]
    assert _integrity(path) == "ok"


def test_a_missing_directory_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot be opened"):
        SqliteStore(tmp_path / "no" / "such" / "dir" / "db.sqlite")


@pytest.mark.xdist_group("mounts")
def test_a_real_full_file_system_mid_transaction_rolls_back_whole_and_is_a_world_fault(
    tmp_path: Path,
) -> None:
    """A ledger on a 1 MiB tmpfs that another program filled: SQLite answers SQLITE_FULL
    when a transaction needs a page the disk cannot give (while writing the WAL), and
    rolls the transaction back whole. The store raises DatabaseFull, which
    ``impl.world`` takes for a fault of the world (exit 4 in ``jobledger download``);
    nothing of the call is visible, what was committed before stays, and once space is
    freed the same call succeeds."""
    from impl.world import fault_of
    from model import ManualClock
    from tests.download.mounts import tmpfs

    with tmpfs(tmp_path / "disk", size="1m") as disk:
        path = disk / "db.sqlite"
        with SqliteStore(path, clock=ManualClock()) as store:
            kept = store.plan("download", {"url": "kept"})
            lease = store.lease_next("w")
            assert lease is not None
            ballast = disk / "ballast"
            fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                with pytest.raises(OSError, match="No space left"):  # noqa: PT012
                    while True:
                        os.write(fd, b"\0" * 4096)
            finally:
                os.close(fd)
            items = [{"url": f"big{i}"} for i in range(200)]
            with pytest.raises(DatabaseFull, match="SQLITE_FULL") as full:
                store.plan_many("download", items)
            conn = store._connection()
            assert not conn.in_transaction
            assert [j.job_id for j in store.jobs()] == [kept]  # nothing of the call
            assert store.job(kept).lease == lease  # what was committed stays
            fault = fault_of(full.value)
            assert fault is not None
            assert fault.what == "database full"
            ballast.unlink()  # space is freed
            assert len(store.plan_many("download", items)) == 200
            store.release(lease)
            assert store.job(kept).attempts == 0
        assert _integrity(path) == "ok"


@pytest.mark.xdist_group("mounts")
def test_a_worker_that_cannot_take_a_lease_from_a_full_ledger_tells_its_on_error(
    tmp_path: Path,
) -> None:
    """Taking a lease from a ledger whose disk is full fails outside any handler: the
    worker passes the DatabaseFull to ``on_error`` (``jobledger download`` stops the run
    there with exit 4); a callback that stops the worker ends ``run`` at once, with
    nothing leased and no attempt spent."""
    from impl.worker import Worker
    from model import JobledgerError, ManualClock
    from tests.download.mounts import tmpfs

    with (
        tmpfs(tmp_path / "disk", size="1m") as disk,
        SqliteStore(disk / "db.sqlite", clock=ManualClock()) as store,
    ):
        job = store.plan("download", {"url": "waiting"})
        # An empty WAL: the next commit needs new pages (an allocated WAL would be reused).
        store._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        fd = os.open(disk / "ballast", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError, match="No space left"):  # noqa: PT012
                while True:
                    os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
        seen: list[JobledgerError] = []
        ran: list[str] = []

        def on_error(exc: JobledgerError) -> None:
            seen.append(exc)
            worker.stop()

        worker = Worker(store, {"download": lambda ctx: ran.append(ctx.job_id)}, on_error=on_error)
        started = time.monotonic()
        worker.run()
        assert time.monotonic() - started < 10
        assert len(seen) == 1
        assert isinstance(seen[0], DatabaseFull)
        assert ran == []
        info = store.job(job)
        assert (info.state, info.attempts, info.lease) == ("PLANNED", 0, None)
