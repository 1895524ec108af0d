"""Waiting for work on SQLite: a cheap change check instead of a poll of the queue.

SQLite has no notifications, but ``PRAGMA data_version`` on a connection changes
whenever another connection (in any process) has committed since it last asked, and
asking costs a few tens of microseconds. One :class:`ChangeWatch` per store asks it on a
connection kept for it every :data:`CHANGE_CHECK_INTERVAL` seconds, in one thread however
many threads wait (a ``Worker`` with ``concurrency=16`` costs what one costs), and
counts what it sees in a *generation* number. A waiter (:func:`wait_for_work`) notes the
generation, then reads when the first job becomes eligible (``queries.NEXT_DUE``), then
sleeps until the generation moves or that time comes: a job planned with a future
``run_at``, released with a delay or held by a lease that will expire becomes eligible
later without any write. A commit after the read is one the watch has not seen yet, so
it moves the generation: none is missed between the read and the sleep.

On Linux the watch does not poll at all while nothing happens: it asks the kernel
(``inotify``, :class:`WalWrites`) to wake it when anything writes the WAL file, which
every commit does, and checks ``data_version`` then; with nothing written it still checks
every :data:`FALLBACK_INTERVAL` (a file system that sends no events, a WAL replaced).
A write wakes it before the commit is complete (the WAL index is updated after the
frames are written, and after their fsync with ``synchronous = FULL``), so a write that
shows no change yet is looked at again shortly after (:data:`RECHECKS`). Measured with
one idle worker on a loaded machine, polling every 10 ms cost 0.8-1.4% of a core, most
of it the wake-ups themselves. An ``inotify`` watch is a watch of a path: it opens no
descriptor of the file (see below why that matters). Where ``inotify`` is missing, the
watch polls every :data:`CHANGE_CHECK_INTERVAL` as before.

Why not read the WAL index (the ``-shm`` file) directly, which costs no statement: a
process may not open and close a file descriptor of its own on a file SQLite locks.
Closing any descriptor of a file drops every POSIX lock the process holds on it, its
connections' WAL locks included. A first version did that once per store (to map the
index), and a run of the multi-process crash fuzz (``jobledger selftest``) then reported
a recorded effect result missing. Only SQLite touches the database's files.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import select
import sqlite3
import sys
import threading
import time
from pathlib import Path

from attrs import frozen

from impl.sqlite import queries as q
from impl.sqlite.connection import LedgerConnection, open_connection, reading
from impl.sqlite.row import text_of
from impl.sqlite.waiting import is_busy
from model.clock import Clock
from model.config import Config

log = logging.getLogger("jobledger.worker")

CHANGE_CHECK_INTERVAL = 0.01
"""Seconds between two change checks while anyone waits (without ``inotify``)."""
FALLBACK_INTERVAL = 0.25
"""With ``inotify``: the longest time between two change checks while anyone waits."""
RECHECKS = (0.001, 0.003, 0.01)
"""With ``inotify``: after a write that showed no change yet, look again after these
pauses (seconds): the commit that wrote may not have updated the WAL index yet."""
IDLE_GRACE = 2.0
"""Seconds the watching thread outlives its last waiter (a worker between two jobs
waits again at once; a thread per wait would cost more than it saves)."""
SLOW_DUE_READ = 0.005
"""Seconds above which the read of when work is due counts as slow (many unfinished jobs)."""
SLOW_READ_SHARE = 0.1
"""After a slow read, the next waits so that such reads take at most this share of time."""
STOP_SLICE = 0.1
"""A waiter looks at its stop event at least this often (seconds)."""
READY_TIMEOUT = 5.0
"""Seconds a waiter waits for a new watch thread to read its first data version."""


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


_IN_MODIFY = 0x2
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class WalWrites:
    """Wakes a thread when anything writes the WAL file ``wal`` (Linux ``inotify``).

    Raises :class:`OSError` where ``inotify`` is missing or refuses (no such calls, too
    many watches, no WAL file yet); the caller then polls.
    """

    def __init__(self, wal: Path) -> None:
        if not sys.platform.startswith("linux"):
            raise OSError(errno.ENOSYS, "inotify is Linux's")
        libc = ctypes.CDLL(None, use_errno=True)
        fd = int(libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC))
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_init1: {os.strerror(code)}")
        mask = _IN_MODIFY | _IN_DELETE_SELF | _IN_MOVE_SELF
        if libc.inotify_add_watch(fd, os.fsencode(wal), ctypes.c_uint32(mask)) < 0:
            code = ctypes.get_errno()
            os.close(fd)
            raise OSError(code, f"inotify_add_watch {wal}: {os.strerror(code)}")
        self.fd = fd
        self._wake_r, self._wake_w = os.pipe()  # wake(): a closing store need not wait
        # poll, not select: select refuses descriptors numbered 1024 and above.
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._poll.register(self._wake_r, select.POLLIN)

    def wait(self, timeout: float) -> bool:
        """Sleep until the WAL is written, :meth:`wake` is called or ``timeout`` seconds
        pass; True if written. Every event already queued is read, so one wake-up covers
        a burst of writes."""
        ready = [fd for fd, _ in self._poll.poll(max(0, int(timeout * 1000)))]
        if self.fd not in ready:
            return False
        with contextlib.suppress(BlockingIOError):
            while os.read(self.fd, 4096):
                pass
        return True

    def wake(self) -> None:
        """End a :meth:`wait` now (from another thread)."""
        os.write(self._wake_w, b"x")

    def close(self) -> None:
        """Close the ``inotify`` descriptor (not a descriptor of the WAL) and the pipe."""
        for fd in (self.fd, self._wake_r, self._wake_w):
            os.close(fd)


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
        self._ready = threading.Event()
        self._closing = False
        self._writes: WalWrites | None = None

    @property
    def generation(self) -> int:
        """Moves whenever the watch has seen a commit."""
        return self._generation

    def enter(self) -> None:
        """Count a waiter in; start looking if nobody was.

        Returns once the thread has read the data version it compares against: a commit
        made before that read would otherwise never count as a change, and a waiter
        whose own look for work came just before that commit would sleep through it.
        """
        with self._cond:
            self._waiters += 1
            if self._thread is None and not self._closing:
                self._ready = threading.Event()
                self._thread = threading.Thread(
                    target=self._run,
                    args=(self._ready,),
                    name=f"jobledger-watch:{self.path.name}",
                    daemon=True,
                )
                self._thread.start()
            ready = self._ready
        ready.wait(READY_TIMEOUT)

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
        """Stop the thread (it closes its connection)."""
        with self._cond:
            self._closing = True
            thread = self._thread
            if self._writes is not None:
                self._writes.wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)

    def _done(self) -> bool:
        with self._cond:
            idle = self._waiters == 0 and time.monotonic() - self._last_waiter > IDLE_GRACE
            if self._closing or idle:
                self._thread = None
                return True
            return False

    def _run(self, ready: threading.Event) -> None:
        conn: LedgerConnection | None = None
        writes: WalWrites | None = None
        try:
            conn = open_connection(self.path, self.config)
            # One cursor, one cached statement, no wrapper: this may run 100 times a second.
            cursor = conn.cursor()
            last = _data_version(cursor)  # opens the WAL, which the watch then follows
            try:
                writes = WalWrites(self.path.with_name(self.path.name + "-wal"))
            except OSError as exc:
                log.debug("no inotify on %s (%s): polling for changes", self.path, exc)
            with self._cond:
                self._writes = writes
            ready.set()
            rechecks: tuple[float, ...] = ()
            while not self._done():
                if rechecks:
                    time.sleep(rechecks[0])
                    rechecks = rechecks[1:]
                    written = False
                elif writes is not None:
                    written = writes.wait(FALLBACK_INTERVAL)
                else:
                    time.sleep(CHANGE_CHECK_INTERVAL)
                    written = False
                now = _data_version(cursor)
                if now != last:
                    last = now
                    rechecks = ()
                    with self._cond:
                        self._generation += 1
                        self._cond.notify_all()
                elif written:
                    rechecks = RECHECKS
        except Exception:  # the waiters fall back on their timeouts; say why
            log.exception("watching %s for new jobs failed; idle workers poll instead", self.path)
            with self._cond:
                self._thread = None
        finally:
            ready.set()  # a watch that failed to start must not hold its waiters up
            if writes is not None:
                with self._cond:
                    self._writes = None
                writes.close()
            if conn is not None:
                conn.close()


def _data_version(cursor: sqlite3.Cursor) -> int | None:
    """The connection's data version; None while a lock keeps it from being read (only
    while a crashed writer's WAL is recovered), which counts as a change: the waiters
    look, and do their own waiting for the lock."""
    try:
        cursor.execute(q.DATA_VERSION)
        row = cursor.fetchone()
    except sqlite3.OperationalError as exc:
        if is_busy(exc):
            return None
        raise
    return int(row[0])


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
            began = time.monotonic()
            due_in = _due_in(conn, clock, query)
            now = time.monotonic()
            if due_in is not None and due_in <= 0:
                return True
            if now >= deadline or (stop is not None and stop.is_set()):
                return False
            wake = deadline if due_in is None else min(deadline, now + due_in)
            watch.wait_change(seen, wake, stop)
            took = now - began
            if took > SLOW_DUE_READ and watch.generation != seen:
                # The read walks every unfinished job (40 ms for 100,000 planned for
                # later): not again on every commit, or an idle worker would spend a
                # core on it. At most a tenth of the time goes to such reads.
                calm = min(now + took * (1 / SLOW_READ_SHARE - 1), wake)
                if stop is not None:
                    stop.wait(max(0.0, calm - time.monotonic()))
                else:
                    time.sleep(max(0.0, calm - time.monotonic()))
    finally:
        watch.leave()
