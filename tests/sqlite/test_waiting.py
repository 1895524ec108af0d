"""Waiting for a lock another connection holds (impl.sqlite.waiting).

The waits are real: a second connection on the same file holds the write lock (or, for
a reader, an exclusive lock) and a timer thread lets it go.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from impl.sqlite import waiting
from impl.sqlite.store import SqliteStore
from impl.sqlite.waiting import FIRST_PAUSE, LONGEST_PAUSE, is_busy, patiently
from model import Config, DatabaseLocked, Workflow

OTHER = Workflow("other", ["NEW", "DONE"], [("NEW", "DONE")], "NEW", ["DONE"])


@contextmanager
def write_lock_held(path: Path, *, release_after: float | None = None) -> Iterator[None]:
    """Hold the write lock of ``path`` on another connection for the body (or, with
    ``release_after``, until that many seconds have passed, from another thread)."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    timer = None
    if release_after is not None:
        timer = threading.Timer(release_after, holder.rollback)
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.join()
        if holder.in_transaction:
            holder.rollback()
        holder.close()


def test_lease_next_does_not_wait_for_the_writer_when_nothing_is_eligible(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db.sqlite"
    # Waiting at all would end in DatabaseLocked: the lock is held for the whole call.
    with SqliteStore(path, config=Config(busy_timeout=1.0)) as store:
        store.register(OTHER)
        later = store.plan("download", {"url": "later"}, run_at=store.now() + 3600)
        now = store.plan("other", {"n": 1})
        with write_lock_held(path):
            assert store.lease_next("w", kinds=["download"]) is None
            assert store.lease_next("w", kinds=["download", "another"]) is None
        leased = store.lease_next("w")
        assert leased is not None
        assert leased.job_id == now
        assert store.advance(leased, "DONE")
        with write_lock_held(path):
            assert store.lease_next("w") is None
        assert store.state(later) == "PLANNED"
        assert [h.event.value for h in store.history(later)] == ["planned"]


def test_lease_next_waits_for_the_writer_when_a_job_is_eligible(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with SqliteStore(path, config=Config(busy_timeout=10.0)) as store:
        store.register(OTHER)
        job = store.plan("other", {"n": 1})
        with write_lock_held(path, release_after=0.3):
            lease = store.lease_next("w", kinds=["other"])
        assert lease is not None
        assert lease.job_id == job


def test_a_writer_that_outlasts_the_busy_timeout_fails_lease_next_typed(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with SqliteStore(path, config=Config(busy_timeout=0.2)) as store:
        job = store.plan("download", {"url": "a"})
        with write_lock_held(path), pytest.raises(DatabaseLocked, match="busy timeout"):
            store.lease_next("w")
        assert store.state(job) == "PLANNED"
        assert store.leases() == []


@contextmanager
def exclusive_lock_held(path: Path, release_after: float) -> Iterator[None]:
    """Lock ``path`` against readers too (exclusive locking mode), for ``release_after``
    seconds; only a connection that is not open yet can be kept out this way."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("COMMIT")  # the exclusive lock stays until the connection closes
    timer = threading.Timer(release_after, holder.close)
    timer.start()
    try:
        yield
    finally:
        timer.join()


def test_opening_and_reading_wait_for_an_exclusive_lock(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with SqliteStore(path) as store:
        job = store.plan("download", {"url": "a"})
    with (
        exclusive_lock_held(path, release_after=0.3),
        SqliteStore(path, config=Config(busy_timeout=10.0)) as store,
    ):
        assert store.state(job) == "PLANNED"


def test_migrating_waits_for_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    empty = sqlite3.connect(path)
    empty.execute("PRAGMA journal_mode = WAL")
    empty.close()
    with (
        write_lock_held(path, release_after=0.3),
        SqliteStore(path, config=Config(busy_timeout=10.0)) as store,
    ):
        assert store.state(store.plan("download", {"url": "a"})) == "PLANNED"


def test_opening_past_the_busy_timeout_is_typed_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with SqliteStore(path) as store:
        job = store.plan("download", {"url": "a"})
    before = path.read_bytes()
    with (
        exclusive_lock_held(path, release_after=1.0),
        pytest.raises(DatabaseLocked, match="busy timeout"),
    ):
        SqliteStore(path, config=Config(busy_timeout=0.1))
    assert path.read_bytes() == before
    with SqliteStore(path) as store:
        assert store.state(job) == "PLANNED"


def test_patiently_tries_again_only_on_a_busy_lock(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    sqlite3.connect(path).close()
    waiter = sqlite3.connect(path, isolation_level=None, timeout=0)
    tries: list[float] = []

    def begin() -> bool:
        tries.append(time.monotonic())
        waiter.execute("BEGIN IMMEDIATE")
        return True

    try:
        with write_lock_held(path, release_after=0.2):
            assert patiently(10.0, begin)
        assert waiter.in_transaction
        assert len(tries) > 1
        assert tries[-1] - tries[0] >= 0.15
        waiter.rollback()

        tries.clear()
        with write_lock_held(path), pytest.raises(sqlite3.OperationalError) as busy:
            patiently(0.1, begin)
        assert is_busy(busy.value)
        assert len(tries) > 1
        assert tries[-1] - tries[0] <= 1.0, "waited far past the timeout"

        tries.clear()

        def broken() -> None:
            tries.append(time.monotonic())
            waiter.execute("SELEC 1")

        with pytest.raises(sqlite3.OperationalError, match="syntax error"):
            patiently(10.0, broken)
        assert len(tries) == 1
    finally:
        waiter.close()


def test_patiently_sleeps_double_from_the_first_pause_to_the_longest_jittered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1, 2, 4, ... ms up to the longest pause, each within [0.5, 1.5) of its step: a
    waiter behind dozens of processes tries rarely, one behind a short write soon."""
    path = tmp_path / "db.sqlite"
    sqlite3.connect(path).close()
    waiter = sqlite3.connect(path, isolation_level=None, timeout=0)
    slept: list[float] = []
    monkeypatch.setattr(waiting.time, "sleep", slept.append)
    tries = 0

    def begin() -> None:
        nonlocal tries
        tries += 1
        if tries == 12:
            holder.rollback()
        waiter.execute("BEGIN IMMEDIATE")

    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        patiently(3600.0, begin)
        assert waiter.in_transaction
    finally:
        waiter.close()
        holder.close()
    steps = [min(FIRST_PAUSE * 2**i, LONGEST_PAUSE) for i in range(11)]
    assert len(slept) == len(steps)
    for pause, step in zip(slept, steps, strict=True):
        assert 0.5 * step <= pause < 1.5 * step
    assert steps[-1] == LONGEST_PAUSE == 0.032
