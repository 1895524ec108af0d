"""Waiting for work on SQLite: a cheap change check instead of a poll of the queue.

SQLite has no notifications, but every commit in WAL mode rewrites the header of the WAL
index, the ``-shm`` file that every connection maps into memory. :class:`WalIndex` maps
that header read-only, so "has anyone committed since?" is a comparison of 96 bytes:
no system call, no statement. One :class:`ChangeWatch` per store makes it every
:data:`CHANGE_CHECK_INTERVAL` seconds, in one thread however many threads wait (a
``Worker`` with ``concurrency=16`` costs what one costs), and counts what it sees in a
*generation* number. A waiter (:func:`wait_for_work`) notes the generation, then reads
when the first job becomes eligible (``queries.NEXT_DUE``), then sleeps until the
generation moves or that time comes: a job planned with a future ``run_at``, released
with a delay or held by a lease that will expire becomes eligible later without any
write. A commit after the read changes the header after the watch's last look, so it
moves the generation: none is missed between the read and the sleep.

Measured on this project's 2-core machine: looking every 5 ms cost about 0.5-0.7% of a
core with the mapped header, against 1.9% with ``PRAGMA data_version`` (which starts a
read transaction: shared-memory locks, a few system calls); the wake-ups themselves are
most of the rest. The pragma is still the fallback when the index cannot be mapped (a
file not in WAL mode).

The mapping can only be read while the ``-shm`` file keeps its size: SQLite truncates
it only when the first connection opens the database after all others closed. So a
:class:`WalIndex` keeps a connection of its own open for as long as its map lives.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from attrs import frozen

from impl.sqlite import queries as q
from impl.sqlite.connection import LedgerConnection, open_connection, reading
from impl.sqlite.row import text_of
from impl.sqlite.waiting import patiently
from model.clock import Clock
from model.config import Config

log = logging.getLogger("jobledger.worker")

CHANGE_CHECK_INTERVAL = 0.01
"""Seconds between two change checks while anyone waits."""
IDLE_GRACE = 2.0
"""Seconds the watching thread outlives its last waiter (a worker between two jobs
waits again at once; a thread per wait would cost more than it saves)."""
STOP_SLICE = 0.1
"""A waiter looks at its stop event at least this often (seconds)."""

WAL_INDEX_HEADER = 96
"""Bytes of the WAL index header (two copies of 48 bytes) that every commit rewrites."""


@frozen
class DueQuery:
    """The statement that reads when the first job of some kinds becomes eligible."""

    sql: str
    params: dict[str, str]


EVERY_KIND = DueQuery(q.NEXT_DUE, {})


@functools.lru_cache(maxsize=64)
def due_query(kinds: tuple[str, ...] | None) -> DueQuery:
    """The due query for ``kinds`` (None: every kind)."""
    if kinds is None:
        return EVERY_KIND
    if len(kinds) == 1:
        return DueQuery(q.NEXT_DUE_OF_KIND, {"kind": kinds[0]})
    return DueQuery(q.NEXT_DUE_OF_KINDS, {"kinds": text_of(list(kinds))})


class WalIndex:
    """A read-only map of the WAL index header of one database file.

    Raises ``OSError`` or ``sqlite3.Error`` when the file has no WAL index to map.
    """

    def __init__(self, path: Path, *, wait_limit: float) -> None:
        # Its own connection (never used for statements after this): while it is open,
        # no connection can be the first to open the file, so none truncates the index.
        self._conn = sqlite3.connect(path, timeout=0.0, check_same_thread=False)
        try:
            # A read maps (and, if needed, creates) the WAL index.
            patiently(wait_limit, lambda: self._conn.execute(q.DATA_VERSION).fetchone())
            shm = Path(f"{path}-shm")
            with shm.open("rb") as f:
                if os.fstat(f.fileno()).st_size < WAL_INDEX_HEADER:
                    raise OSError(f"{shm} is too short to be a WAL index")
                self._map = mmap.mmap(f.fileno(), WAL_INDEX_HEADER, access=mmap.ACCESS_READ)
        except BaseException:
            self._conn.close()
            raise
        self._lock = threading.Lock()
        self._closed = False

    def mark(self) -> bytes:
        """The header now: it differs from an earlier mark once anyone has committed."""
        return self._map[:WAL_INDEX_HEADER]

    def close(self) -> None:
        """Unmap the header, then close the connection that kept it in place."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._map.close()
            with suppress(sqlite3.Error):
                self._conn.close()


class ChangeWatch:
    """One thread that looks for commits to one file while anyone waits for them."""

    def __init__(self, path: Path, config: Config) -> None:
        self.path = path
        self.config = config
        self.pid = os.getpid()
        """The process it watches for: a child of ``fork`` has no thread, and makes its own."""
        self._cond = threading.Condition()
        self._generation = 0
        self._waiters = 0
        self._last_waiter = time.monotonic()
        self._thread: threading.Thread | None = None
        self._closing = False
        try:
            self._wal: WalIndex | None = WalIndex(path, wait_limit=config.busy_timeout)
        except (OSError, sqlite3.Error, ValueError):
            self._wal = None

    @property
    def generation(self) -> int:
        """Moves whenever the watch has seen a commit."""
        return self._generation

    def enter(self) -> None:
        """Count a waiter in; start looking if nobody was."""
        with self._cond:
            self._waiters += 1
            if self._thread is None and not self._closing:
                self._thread = threading.Thread(
                    target=self._run, name=f"jobledger-watch:{self.path.name}", daemon=True
                )
                self._thread.start()

    def leave(self) -> None:
        """Count a waiter out."""
        with self._cond:
            self._waiters -= 1
            self._last_waiter = time.monotonic()

    def wait_change(self, seen: int, until: float, stop: threading.Event | None) -> None:
        """Sleep until the generation is no longer ``seen``, ``time.monotonic()`` reaches
        ``until``, or ``stop`` is set."""
        with self._cond:
            while self._generation == seen and not (stop is not None and stop.is_set()):
                left = until - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(min(left, STOP_SLICE) if stop is not None else left)

    def close(self) -> None:
        """Stop the thread and unmap the index."""
        with self._cond:
            self._closing = True
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        if self._wal is not None:
            self._wal.close()

    def _done(self) -> bool:
        with self._cond:
            idle = self._waiters == 0 and time.monotonic() - self._last_waiter > IDLE_GRACE
            if self._closing or idle:
                self._thread = None
                return True
            return False

    def _run(self) -> None:
        conn: LedgerConnection | None = None
        try:
            if self._wal is not None:
                mark: Callable[[], object] = self._wal.mark
            else:
                conn = open_connection(self.path, self.config)
                pragma = conn

                def mark() -> object:
                    return reading(
                        pragma,
                        "wait_for_work",
                        lambda: pragma.execute(q.DATA_VERSION).fetchone(),
                    )

            last = mark()
            while not self._done():
                time.sleep(CHANGE_CHECK_INTERVAL)
                now = mark()
                if now != last:
                    last = now
                    with self._cond:
                        self._generation += 1
                        self._cond.notify_all()
        except Exception:  # the waiters fall back on their timeouts; say why
            log.exception("watching %s for new jobs failed; idle workers poll instead", self.path)
            with self._cond:
                self._thread = None
        finally:
            if conn is not None:
                conn.close()


def _due_in(conn: LedgerConnection, clock: Clock, query: DueQuery) -> float | None:
    """Seconds until the first job of the query's kinds is eligible (<= 0: it is now)."""

    def read() -> object:
        return conn.execute(query.sql, query.params).fetchone()[0]

    due = reading(conn, "wait_for_work", read)
    return None if due is None else float(due) - float(clock())  # type: ignore[arg-type]


def wait_for_work(
    conn: LedgerConnection,
    clock: Clock,
    query: DueQuery,
    *,
    watch: ChangeWatch,
    timeout: float,
    stop: threading.Event | None,
) -> bool:
    """True once a job of the query's kinds is eligible, False after ``timeout`` seconds
    or once ``stop`` is set (see ``Store.wait_for_work``)."""
    deadline = time.monotonic() + timeout
    watch.enter()
    try:
        while True:
            seen = watch.generation
            due_in = _due_in(conn, clock, query)
            if due_in is not None and due_in <= 0:
                return True
            now = time.monotonic()
            if now >= deadline or (stop is not None and stop.is_set()):
                return False
            wake = deadline if due_in is None else min(deadline, now + due_in)
            watch.wait_change(seen, wake, stop)
    finally:
        watch.leave()
