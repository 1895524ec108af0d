"""SQLite connections: opening them, their pragmas, transactions and error translation.

Pragmas are per connection, so :func:`open_connection` applies them to every connection
it opens. Writes always run in a :class:`Tx`, which issues ``BEGIN IMMEDIATE``
itself (the driver's implicit transactions are off): a deferred transaction that reads
and then writes fails at once with ``SQLITE_BUSY_SNAPSHOT`` whatever the busy timeout,
while ``BEGIN IMMEDIATE`` can wait for the write lock. The waiting is jobledger's own
(:mod:`impl.sqlite.waiting`), not SQLite's busy handler. :func:`translated` turns every
``sqlite3`` exception into the typed errors of ``model.errors``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from impl import failpoint, telemetry
from impl.sqlite import queries as q
from impl.sqlite import writers
from impl.sqlite.checkpoint import Checkpointer, checkpoints_in_background
from impl.sqlite.row import inline_entries, text_of
from impl.sqlite.waiting import BUSY, LOCKED, is_busy, patiently, primary_code
from model.clock import Clock
from model.config import Config
from model.errors import (
    DatabaseCorrupt,
    DatabaseFull,
    DatabaseLocked,
    DatabaseReadOnly,
    IllegalTransition,
    JobledgerError,
    StorageError,
)
from model.record import Event, HistoryEvent

if TYPE_CHECKING:
    from impl.sqlite.group import Group

T = TypeVar("T")

# Primary result codes (the low byte of an extended code), from sqlite3.h.
_READONLY = 8
_INTERRUPT = 9
_CORRUPT = 11
_FULL = 13
_CANTOPEN = 14
_CONSTRAINT = 19
_NOTADB = 26


class LedgerConnection(sqlite3.Connection):
    """A connection that knows how long its callers may wait for a lock."""

    __slots__ = ("gate", "group", "wait_limit", "writers")

    wait_limit: float
    """Seconds (the configured ``busy_timeout``)."""

    gate: threading.Lock
    """The writers' gate of this process for this file (see :func:`writer_gate`)."""

    group: Group | None
    """The group whose transaction this connection's transactions join (see
    :mod:`impl.sqlite.group`), or None: each commits on its own."""

    writers: writers.WritersQueue | None
    """The queue of every process's writers on this file (:mod:`impl.sqlite.writers`)
    that this connection's ungrouped transactions take, or None: they poll."""


class GroupedConnection(LedgerConnection):
    """A thread's connection whose write transactions run on its group's connection.

    While its thread is a member of the group transaction (inside a :class:`Tx`),
    every statement goes to the group's connection, so the code of a transaction's body
    is the same grouped or not; outside one, it reads on its own connection, which sees
    only committed writes.
    """

    __slots__ = ("route",)

    route: sqlite3.Connection | None

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        """Run ``sql`` on the group's connection inside a transaction, else on this one."""
        route = self.route
        if route is None:
            return sqlite3.Connection.execute(self, sql, parameters)
        return route.execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        """Run ``sql`` for each of ``parameters``, routed as :meth:`execute` is."""
        route = self.route
        if route is None:
            return sqlite3.Connection.executemany(self, sql, parameters)
        return route.executemany(sql, parameters)

    @property
    def in_transaction(self) -> bool:
        """Whether this thread's statements run inside a transaction now: the group's,
        while its thread is a member (a prune's archive callback reads in it)."""
        route = self.route
        if route is None:
            return sqlite3.Connection.in_transaction.__get__(self)  # type: ignore[no-any-return]
        return route.in_transaction

    @property
    def total_changes(self) -> int:
        """Rows changed on the connection that runs this thread's statements now."""
        route = self.route
        if route is None:
            return sqlite3.Connection.total_changes.__get__(self)  # type: ignore[no-any-return]
        return route.total_changes


_GATES: dict[str, threading.Lock] = {}
_GATES_LOCK = threading.Lock()
GATE_FIRST_PROBE = 0.002
GATE_LONGEST_PROBE = 0.05
"""Seconds between two idle probes of a transaction waiting at the gate (see Tx): the
pause doubles from the first to the longest, so that dozens of threads queued behind
busy writers do not spend the interpreter on probes that find work every time."""


def writer_gate(path: Path) -> threading.Lock:
    """The one lock that every write transaction of this process on ``path`` holds.

    SQLite admits one writer per file. Threads of one process that met the write lock
    would each wait in :mod:`impl.sqlite.waiting`'s sleeps (1 to 8 ms) and poll it; with
    dozens of handler threads most of a job's time went to those sleeps. Queued on a lock
    instead, a thread is handed the write lock the moment the previous writer of its
    process commits. Other processes still meet SQLite's lock and wait as before.
    A forked child starts with fresh gates: a gate copied while a parent's thread held it
    would never be released in the child.
    """
    key = os.path.realpath(path)
    with _GATES_LOCK:
        gate = _GATES.get(key)
        if gate is None:
            gate = _GATES[key] = threading.Lock()
        return gate


def open_connection(
    path: Path, config: Config, *, shared: bool = False, group: Group | None = None
) -> LedgerConnection:
    """Open a connection to ``path`` with jobledger's pragmas applied.

    SQLite's own busy handler is off (timeout 0): every wait for a lock is jobledger's
    (:mod:`impl.sqlite.waiting`), for up to ``config.busy_timeout`` seconds. ``shared``
    lets threads other than the opener use it (a group's connection, one thread at a
    time); with ``group``, the connection's transactions join that group's.

    Raises:
        StorageError: (a subclass where one fits) if the file cannot be opened or is not
            a database.
    """
    with translated(f"open {path}"):
        conn = sqlite3.connect(
            path,
            timeout=0.0,
            isolation_level=None,
            check_same_thread=not shared,
            factory=LedgerConnection if group is None else GroupedConnection,
        )
        conn.wait_limit = config.busy_timeout
        conn.gate = writer_gate(path)
        conn.group = group
        conn.writers = None
        if isinstance(conn, GroupedConnection):
            conn.route = None
        try:
            # Before the switch to WAL, which writes a new file's first page.
            conn.execute(q.PRAGMA_PAGE_SIZE)
            # Only for a new, empty file (before its first table): its free pages can then
            # be given back after a prune (retention.reclaim). An existing file keeps its
            # mode, and is not written to here (the pragma would touch its header).
            patiently(config.busy_timeout, lambda: _incremental_vacuum_if_new(conn))
            # Switching needs an exclusive lock: a process opening a new file while
            # another one switches or migrates it waits here.
            patiently(config.busy_timeout, lambda: conn.execute(q.PRAGMA_JOURNAL_WAL).fetchall())
            conn.execute(q.PRAGMA_SYNCHRONOUS[config.sqlite_synchronous])
            if checkpoints_in_background(config):
                conn.execute(q.PRAGMA_WAL_AUTOCHECKPOINT)
            conn.execute(q.PRAGMA_FOREIGN_KEYS_ON)
        except BaseException:
            conn.close()
            raise
        if group is None and config.sqlite_writers_queue == "mutex":
            # Only once the file proved to be a database: a file that is not one is left
            # alone, with nothing new beside it.
            conn.writers = writers.queue_for(path)
    return conn


def _incremental_vacuum_if_new(conn: sqlite3.Connection) -> None:
    if conn.execute(q.PRAGMA_PAGE_COUNT).fetchone()[0] == 0:
        conn.execute(q.PRAGMA_AUTO_VACUUM_INCREMENTAL)


class Held:
    """A connection and the process that opened it (see :func:`open_held`)."""

    __slots__ = ("__weakref__", "conn", "pid")

    def __init__(self, conn: LedgerConnection, pid: int) -> None:
        self.conn = conn
        self.pid = pid


# A connection must never be used, closed or even freed in a forked child: freeing it
# closes it, and closing can checkpoint and unlink the parent's WAL. CPython frees the
# thread-locals of the parent's other threads in the child before any after-fork hook
# runs, so every live connection is pinned in _PINNED *before* the fork: the parent
# unpins them afterwards, the child keeps them pinned (unused) for good.
_LIVE: weakref.WeakSet[Held] = weakref.WeakSet()
_PINNED: list[Held] = []


def _pin_before_fork() -> None:
    _PINNED.extend(list(_LIVE))


def _unpin_in_parent() -> None:
    _PINNED.clear()


# This process's id, kept current across forks: asking the kernel on every call costs
# more than the rest of finding the calling thread's connection.
_PID = [os.getpid()]


def _note_child_pid() -> None:
    _PID[0] = os.getpid()
    _GATES.clear()
    global _GATES_LOCK  # noqa: PLW0603 - a lock held at fork time is replaced, not reused
    _GATES_LOCK = threading.Lock()


os.register_at_fork(
    before=_pin_before_fork, after_in_parent=_unpin_in_parent, after_in_child=_note_child_pid
)


def open_held(
    path: Path, config: Config, *, shared: bool = False, group: Group | None = None
) -> Held:
    """Open a connection (:func:`open_connection`) that a forked child never frees.

    Keep the returned holder for as long as the connection is used.
    """
    held = Held(open_connection(path, config, shared=shared, group=group), _PID[0])
    _LIVE.add(held)
    return held


def _open_for_checkpoints(path: Path, config: Config) -> tuple[LedgerConnection, object]:
    held = open_held(path, config)
    return held.conn, held


class ThreadConnections:
    """One connection per thread and per process for one database file.

    Connections are opened lazily, never shared between threads (``check_same_thread``)
    and never reused after ``fork``: a child opens its own.
    """

    def __init__(self, path: Path, config: Config) -> None:
        self._path = path
        self._config = config
        self._local = threading.local()
        self._closed = False
        self._group: Group | None = None
        self._group_done: Callable[[], object] | None = None
        if config.sqlite_group_window > 0:
            self._join_group()
        self._checkpointer: Checkpointer | None = None
        if checkpoints_in_background(config):
            checkpointer = Checkpointer(
                path, functools.partial(_open_for_checkpoints, path, config)
            )
            # A store dropped without close() must not leave its thread running.
            weakref.finalize(self, checkpointer.stop, wait=False)
            self._checkpointer = checkpointer

    def get(self) -> LedgerConnection:
        """Return the calling thread's connection in this process, opening it if needed.

        Raises:
            StorageError: if closed, or the file cannot be opened.
        """
        self.check_open()
        held: Held | None = getattr(self._local, "held", None)
        if held is not None and held.pid == _PID[0]:
            return held.conn
        group = self._group
        if group is not None and group.pid != _PID[0]:
            # A store carried across fork: its parent's group is not this process's.
            group = self._join_group()
        held = open_held(self._path, self._config, group=group)
        self._local.held = held
        if self._checkpointer is not None:
            self._checkpointer.ensure_running()
        return held.conn

    def _join_group(self) -> Group:
        from impl.sqlite import group as groups  # noqa: PLC0415 - group imports this module

        group = self._group = groups.acquire(self._path, self._config)
        # A store dropped without close() must not keep the group's connection open.
        self._group_done = weakref.finalize(self, groups.release, group)
        return group

    def check_open(self) -> None:
        """Raise :class:`StorageError` if :meth:`close` was called."""
        if self._closed:
            raise StorageError(
                f"the store on {self._path} is closed; open a new one with open_store"
            )

    def close(self) -> None:
        """Close the calling thread's connection; free the other threads' ones."""
        self._closed = True
        if self._checkpointer is not None:
            self._checkpointer.stop()
        if self._group_done is not None:
            self._group_done()
        held: Held | None = getattr(self._local, "held", None)
        if held is not None and held.pid == _PID[0]:
            held.conn.close()
        # Other threads' connections cannot be closed from this one (check_same_thread);
        # dropping the thread-local frees them, and freeing a connection closes it.
        self._local = threading.local()


def _names(op: str) -> tuple[str, str, str]:
    return (f"{op}.before_tx", f"{op}.before_commit", f"{op}.after_commit")


# Failpoint names are formatted once per operation, not once per transaction.
_NAMES: dict[str, tuple[str, str, str]] = {op: _names(op) for op in failpoint.OPERATIONS}

HistoryRow = tuple[str, float, str, int, str | None, str]
"""One history entry as written: job_id, at, event, token, worker, detail text."""

# Worker names and times inside an inline history line (canonical, like every stored text).
_JSON_TEXT = json.JSONEncoder(ensure_ascii=False)


@functools.lru_cache(maxsize=1024)
def worker_text(worker: str | None) -> str:
    """A worker name (or None) as JSON text, for an inline history line."""
    # Cached: a process has few worker names, and each writes most entries.
    return "null" if worker is None else _JSON_TEXT.encode(worker)


def float_text(value: float) -> str:
    """``value`` as JSON text that ``json.loads`` reads back exactly."""
    return repr(value) if math.isfinite(value) else _JSON_TEXT.encode(value)


class NothingToWaitFor(Exception):
    """A :class:`Tx` stopped waiting for the write lock: it would change nothing."""


class Tx:
    """One ``BEGIN IMMEDIATE`` write transaction named ``op`` (for failpoints and errors).

    ``with Tx(conn, "advance", clock) as tx:`` hits ``{op}.before_tx``, begins, reads the
    clock once into ``tx.now`` (after the write lock is held, so a call that waited for
    the lock does not act on a time from before it waited), runs the body, hits
    ``{op}.before_commit`` and commits, then hits ``{op}.after_commit``. Any exception
    (``BaseException`` too: a simulated crash must not leave a transaction open on a
    connection a test goes on using) rolls back, and ``sqlite3`` errors leave as the
    typed errors of ``model.errors``. History entries written through :meth:`history`
    are passed to :func:`impl.telemetry.emit_history` once the commit succeeded, and
    never for a transaction that rolled back.

    Before beginning, a transaction takes this process's gate for the file (one writing
    thread per process) and then, where the connection has one, the writers' queue of
    every process (:mod:`impl.sqlite.writers`), hitting ``writers.after_acquire``; both
    are released after the COMMIT or ROLLBACK, on every path. Each wait (gate, queue)
    lasts up to the connection's ``wait_limit``, then raises :class:`DatabaseLocked`.
    While another connection holds the write lock all the same (a process that does not
    queue), beginning waits (see :mod:`impl.sqlite.waiting`) up to ``wait_limit`` too.
    ``pointless``, if given, is asked between two tries whether
    the transaction would change nothing anyway; if it says so, :class:`NothingToWaitFor`
    is raised instead of waiting on.
    """

    __slots__ = (
        "_clock",
        "conn",
        "epoch",
        "events",
        "first",
        "names",
        "now",
        "op",
        "pointless",
        "queued",
        "waited_since",
    )

    def __init__(
        self,
        conn: LedgerConnection,
        op: str,
        clock: Clock | None = None,
        *,
        pointless: Callable[[], bool] | None = None,
    ) -> None:
        self.conn = conn
        self.op = op
        self._clock = clock
        self.pointless = pointless
        names = _NAMES.get(op)
        self.names = names if names is not None else _names(op)
        self.now = 0.0
        self.events: list[HistoryRow] = []
        # A grouped transaction's place in its group (see impl.sqlite.group).
        self.first = True
        self.epoch = 0
        # The writers' queue this transaction holds, if any.
        self.queued: writers.WritersQueue | None = None
        # When this transaction first waited (for the gate, the queue or the lock): the
        # three waits share one busy_timeout, so a caller waits that long in all.
        self.waited_since: float | None = None

    def read_clock(self) -> None:
        """Set ``now`` from the clock (once the write lock is held)."""
        if self._clock is not None:
            self.now = float(self._clock())

    def __enter__(self) -> Tx:
        if failpoint.ARMED:
            failpoint.hit(self.names[0])
        conn = self.conn
        group = conn.group
        if group is not None:
            group.enter(self)
            return self
        if not conn.gate.acquire(blocking=False):
            self._wait_at_gate()
        try:
            queue = conn.writers
            if queue is not None and queue.usable:
                if not queue.acquire(0.0):
                    self._wait_in_queue(queue)
                if queue.usable:
                    self.queued = queue
                if failpoint.ARMED:
                    failpoint.hit(writers.AFTER_ACQUIRE)
            try:
                conn.execute(q.BEGIN_IMMEDIATE)
            except sqlite3.Error as exc:
                if not is_busy(exc):
                    raise translate(exc, self.op) from exc
                try:
                    patiently(self._wait_left(), self._begin_unless_pointless)
                except sqlite3.Error as again:
                    raise translate(again, self.op) from again
            if self._clock is not None:
                try:
                    self.now = float(self._clock())
                except BaseException:
                    rollback_quietly(conn)
                    raise
        except BaseException:
            self._leave()
            raise
        return self

    def _leave(self) -> None:
        """Release the writers' queue (if held) and this process's gate."""
        queue = self.queued
        if queue is not None:
            self.queued = None
            queue.release()
        self.conn.gate.release()

    def _wait_in_queue(self, queue: writers.WritersQueue) -> None:
        """Wait for other processes' writers ahead in the queue, as for the lock: for up
        to ``wait_limit``, asking ``pointless`` now and then."""
        limit = self._wait_left()
        deadline = time.monotonic() + limit
        pause = GATE_FIRST_PROBE
        step = pause if self.pointless is not None else limit
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if queue.acquire(min(left, step)):
                return
            # Asked only after a first wait: most turns in the queue come within it, and
            # a probe is a read that the writer ahead would pay for too.
            if self.pointless is not None:
                if self.pointless():
                    raise NothingToWaitFor(self.op)
                pause = min(pause * 2, GATE_LONGEST_PROBE)
                step = pause
        raise DatabaseLocked(
            f"{self.op}: another process held the ledger's writers' queue "
            f"({queue.path}) for more than the busy timeout ({self.conn.wait_limit:g} s); raise "
            "busy_timeout, or find the process that stays in a transaction or is stopped"
        )

    def _wait_left(self) -> float:
        """Seconds this transaction may still wait: ``wait_limit`` from its first wait,
        shared by the gate, the writers' queue and the lock."""
        now = time.monotonic()
        if self.waited_since is None:
            self.waited_since = now
        return max(0.0, self.conn.wait_limit - (now - self.waited_since))

    def _wait_at_gate(self) -> None:
        """Wait for another thread of this process to finish writing, as for the lock."""
        gate = self.conn.gate
        limit = self._wait_left()
        if self.pointless is None:
            if gate.acquire(timeout=limit):
                return
        else:
            deadline = time.monotonic() + limit
            pause = GATE_FIRST_PROBE
            while True:
                if self.pointless():
                    raise NothingToWaitFor(self.op)
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if gate.acquire(timeout=min(left, pause)):
                    return
                pause = min(pause * 2, GATE_LONGEST_PROBE)
        raise DatabaseLocked(
            f"{self.op}: another thread of this process held the ledger's write lock for "
            f"more than the busy timeout ({self.conn.wait_limit:g} s); raise busy_timeout, "
            "or find the transaction that stays open"
        )

    def _begin_unless_pointless(self) -> None:
        # A probe that meets a busy lock cannot tell: it is waited on like the lock.
        if self.pointless is not None and self.pointless():
            raise NothingToWaitFor(self.op)
        self.conn.execute(q.BEGIN_IMMEDIATE)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self.conn
        group = conn.group
        if group is not None:
            group.exit(self, exc)
            return
        if exc is None:
            try:
                if failpoint.ARMED:
                    failpoint.hit(self.names[1])
                conn.execute(q.COMMIT)
            except BaseException as err:
                if conn.in_transaction:
                    rollback_quietly(conn)
                self._leave()
                if isinstance(err, sqlite3.Error):
                    raise translate(err, self.op) from err
                raise
            self._leave()
            if self.events and telemetry.history_wanted():
                emit_events(self.events)
            if failpoint.ARMED:
                failpoint.hit(self.names[2])
            return
        if conn.in_transaction:
            rollback_quietly(conn)
        self._leave()
        if isinstance(exc, sqlite3.Error):
            raise translate(exc, self.op) from exc

    def history(
        self, job_id: str, event: str, token: int, worker: str | None, detail: str = "{}"
    ) -> None:
        """Append one entry (``detail`` as canonical JSON text) to the job's history.

        The entry goes inline into the job's row, which the transaction writes anyway
        (see schema version 3); a statement that changes the row can carry the entry
        itself instead: see :meth:`entry`.
        """
        line = self.entry(job_id, event, token, worker, detail)
        (length,) = self.conn.execute(q.APPEND_HISTORY, {"job_id": job_id, "line": line}).fetchone()
        self.spill_if_long(job_id, length)

    def entry(
        self, job_id: str, event: str, token: int, worker: str | None, detail: str = "{}"
    ) -> str:
        """Note an entry the caller's statement appends inline; return its ``:line``.

        The statement must end its SET with ``queries.ROW_ENTRY`` and return the new
        length of the text, for :meth:`spill_if_long`.
        """
        self.note(job_id, event, token, worker, detail)
        return self.line(event, token, worker, detail)

    def line(self, event: str, token: int, worker: str | None, detail: str = "{}") -> str:
        """The inline text of an entry at ``now``, for a statement that may change nothing
        (the caller then reports the entry with :meth:`note` only if it did)."""
        return f'[{float_text(self.now)},"{event}",{token},{worker_text(worker)},{detail}]\n'

    def spill_if_long(self, job_id: str, length: int) -> None:
        """Move the job's inline entries to the history table once their text is long.

        Entries keep their positions, so the history reads the same afterwards.
        """
        if length <= q.INLINE_HISTORY_LIMIT:
            return
        conn = self.conn
        text, hist_n = conn.execute(q.SELECT_INLINE_HISTORY, (job_id,)).fetchone()
        rows = [
            (job_id, position, e.at, e.event.value, e.token, e.worker, text_of(e.detail))
            for position, e in inline_entries(job_id, str(text), int(hist_n))
        ]
        conn.executemany(q.INSERT_HISTORY_ROW, rows)
        conn.execute(q.CLEAR_INLINE_HISTORY, (job_id,))

    def note(
        self, job_id: str, event: str, token: int, worker: str | None, detail: str = "{}"
    ) -> None:
        """Report an entry the transaction stored itself (for telemetry, after commit)."""
        self.events.append((job_id, self.now, event, token, worker, detail))


def emit_events(events: list[HistoryRow]) -> None:
    """Pass a committed transaction's history entries to telemetry."""
    for job_id, at, event, token, worker, detail in events:
        telemetry.emit_history(
            HistoryEvent(
                job_id=job_id,
                at=at,
                event=Event(event),
                token=token,
                worker=worker,
                detail=json.loads(detail),
            )
        )


@contextmanager
def snapshot(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run several reads against one consistent snapshot (a read-only transaction).

    Inside a transaction already (a prune's archive callback reading the store on the
    prune's connection), the reads see that transaction's view, which is one snapshot;
    beginning another failed ('cannot start a transaction within a transaction') and
    rolling back would have ended the prune's batch.
    """
    if conn.in_transaction:
        yield conn
        return
    conn.execute(q.BEGIN_DEFERRED)
    try:
        yield conn
    finally:
        if conn.in_transaction:
            rollback_quietly(conn)


def rollback_quietly(conn: sqlite3.Connection) -> None:
    """Roll back ``conn``'s transaction, if any; a failure to is not raised."""
    # A failed rollback (e.g. after SQLITE_FULL SQLite may have rolled back already) must
    # not hide the error that caused it.
    with suppress(sqlite3.Error):
        conn.execute(q.ROLLBACK)


def reading(conn: LedgerConnection, asked: str, read: Callable[[], T]) -> T:
    """Return ``read()``, tried again while a lock it needs is held elsewhere (for up to
    the connection's ``wait_limit``); ``sqlite3`` errors leave as typed errors.

    In WAL mode a read waits only while another connection recovers the WAL after a
    crash. ``read`` must be safe to repeat: reads are; a step that writes must check under
    the write lock what an earlier try did (``migrate`` and ``register`` do).
    """
    with translated(asked):
        return patiently(conn.wait_limit, read)


@contextmanager
def translated(asked: str) -> Iterator[None]:
    """Translate ``sqlite3`` exceptions raised in the body into ``model.errors``.

    ``asked`` names the operation for the message ("plan", "open /path", ...).
    """
    try:
        yield
    except JobledgerError:
        raise
    except sqlite3.Error as exc:
        raise translate(exc, asked) from exc


def translate(exc: sqlite3.Error, asked: str) -> StorageError | IllegalTransition:
    """Return the typed error for the ``sqlite3`` exception ``exc`` raised by ``asked``."""
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    primary = primary_code(exc)
    text = str(exc)
    found = f"SQLite said {text!r} ({name})"
    if primary in (BUSY, LOCKED):
        return DatabaseLocked(
            f"{asked}: the database stayed locked past the busy timeout; {found}. Another "
            "process holds a long write transaction: retry later or raise busy_timeout"
        )
    if primary in (_CORRUPT, _NOTADB) or "file is not a database" in text:
        return DatabaseCorrupt(
            f"{asked}: the file is not a jobledger database or is damaged; {found}. Check "
            "the path; restore the file from a backup if it was a database"
        )
    if primary == _FULL:
        return DatabaseFull(
            f"{asked}: the database or disk is full; {found}. Nothing of this call was "
            "written; free disk space (or raise the page limit) and retry"
        )
    if primary == _READONLY or "readonly database" in text:
        return DatabaseReadOnly(
            f"{asked}: the database refuses writes; {found}. Open it from a writable "
            "location with write permission, without query_only"
        )
    if primary == _CONSTRAINT and "illegal state transition" in text:
        return IllegalTransition(
            f"{asked}: the database rejected a state change; {found}. Only declared edges "
            "of the job's workflow may be followed"
        )
    if primary == _INTERRUPT:
        return StorageError(
            f"{asked}: the statement was interrupted; {found}. Nothing of this call was "
            "written; retry it"
        )
    if primary == _CANTOPEN:
        return StorageError(
            f"{asked}: the database file cannot be opened; {found}. Check that the "
            "directory exists and is writable"
        )
    return StorageError(f"{asked}: the database call failed; {found}")
