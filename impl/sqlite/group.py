"""Group commit: the write transactions of one process's threads on one file, gathered.

With ``sqlite_group_window`` > 0, every :class:`~impl.sqlite.connection.Tx` of a
process on one file writes through one shared connection, the group's, instead of its
thread's own. The first transaction to arrive begins a group transaction (``BEGIN
IMMEDIATE``); a transaction that arrives while the group is open joins it inside a
``SAVEPOINT``, so an error in one member rolls back that member's writes only. A member
whose body is done leaves the group open for the threads queued behind it, or commits
it when no thread is queued, when the group has been open for the window, or when it
holds :data:`GROUP_MEMBERS_MAX` members. Every member returns (or raises what its body
raised) only after the COMMIT that carried its write, or the failure of that COMMIT,
so a call still returns only once what it reports is durable: a member that met an
error waits too, since it may have judged by an earlier member's uncommitted write.

Nothing waits for a timer when a thread is alone: a group with no thread queued commits
as soon as its one member is done, as an ungrouped transaction would. What grouping
saves is per transaction, not per statement: one ``BEGIN``/``COMMIT`` pair (with its
file locks and its WAL frames, written once for pages that several members changed)
for many members, and a page cache that stays warm, since one connection does every
write of the process (SQLite empties a connection's cache whenever another connection
has committed).

Members still run one at a time (they share a connection), in the order they took the
group's lock; every decision (fencing, transitions) is made inside the member's own
statements, against the writes of the members before it, exactly as if each had been a
transaction of its own committed in that order.

Failpoints: ``group.before_commit`` and ``group.after_commit`` around the group's COMMIT
(in the committing thread), and ``group.in_savepoint`` in a member that joined an open
group, after its body and inside its savepoint.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, cast

from impl import failpoint, telemetry
from impl.sqlite import queries as q
from impl.sqlite.connection import (
    GATE_FIRST_PROBE,
    GATE_LONGEST_PROBE,
    GroupedConnection,
    LedgerConnection,
    NothingToWaitFor,
    emit_events,
    open_held,
    rollback_quietly,
    translate,
)
from impl.sqlite.waiting import is_busy, patiently
from model.config import Config
from model.errors import DatabaseLocked, StorageError

if TYPE_CHECKING:
    from impl.sqlite.connection import Held, Tx

GROUP_MEMBERS_MAX = 64
"""A group commits once it holds this many members, even with threads still queued,
so one group does not hold SQLite's write lock for ever under a steady stream."""

AWAIT_PATIENCE = 0.01
"""Seconds a member waits for its group's commit before it tries to commit it itself
(four windows, if longer, up to :data:`AWAIT_PATIENCE_LONGEST`)."""
AWAIT_PATIENCE_LONGEST = 0.1


_FAILURES_KEPT = 64


class Group:
    """One process's group transaction on one file (see the module docstring).

    Shared by every store of the process on the file with the same ``synchronous``
    setting and window (:func:`acquire`); each store releases it when it closes
    (:func:`release`).
    """

    def __init__(self, key: tuple[str, str, float], path: Path, config: Config) -> None:
        self.key = key
        self.path = path
        self.config = config
        self.window = config.sqlite_group_window
        self.pid = os.getpid()
        self.users = 0
        # Held by the member whose statements run on the group's connection now.
        self.lock = threading.Lock()
        # Guards the counters below. A member waiting for its commit sleeps on a lock of
        # its own, released when the commit is settled: waking a Condition's waiters
        # makes each take the Condition's lock again in turn, one thread switch apiece.
        self.mutex = threading.Lock()
        self.waiting = 0
        self.settled = 0
        self.failures: dict[int, BaseException] = {}
        self.sleepers: list[threading.Lock] = []
        # The transaction, read and written only by the holder of ``lock``.
        self.held: Held | None = None
        self.open = False
        self.epoch = 0
        self.members = 0
        self.opened = 0.0

    # -- entering -------------------------------------------------------------------------

    def enter(self, tx: Tx) -> None:
        """Join the open group transaction, or begin one; ``tx.now`` is read inside it.

        Raises:
            NothingToWaitFor: ``tx``'s ``pointless`` said so while it waited.
            DatabaseLocked: it waited past the busy timeout.
        """
        if not self.lock.acquire(blocking=False):
            self._queue(tx)
        try:
            conn = self._connection()
            if self.open:
                try:
                    conn.execute(q.SAVEPOINT_MEMBER)
                except sqlite3.Error as exc:
                    raise translate(exc, tx.op) from exc
                tx.first = False
            else:
                self._begin(tx, conn)
                tx.first = True
            tx.epoch = self.epoch
            self.members += 1
        except BaseException:
            self.lock.release()
            raise
        try:
            tx.read_clock()
        except BaseException:
            self._undo(tx)
            self._leave(tx)
            raise
        cast(GroupedConnection, tx.conn).route = conn

    def _queue(self, tx: Tx) -> None:
        """Wait for the group's lock, as a transaction waits for SQLite's write lock."""
        with self.mutex:
            self.waiting += 1
        try:
            limit = tx.conn.wait_limit
            pointless = tx.pointless
            if pointless is None:
                if self.lock.acquire(timeout=limit):
                    return
            else:
                deadline = time.monotonic() + limit
                pause = GATE_FIRST_PROBE
                while True:
                    if pointless():
                        raise NothingToWaitFor(tx.op)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    if self.lock.acquire(timeout=min(left, pause)):
                        return
                    pause = min(pause * 2, GATE_LONGEST_PROBE)
        finally:
            with self.mutex:
                self.waiting -= 1
        raise DatabaseLocked(
            f"{tx.op}: other threads of this process held the ledger's group transaction "
            f"for more than the busy timeout ({limit:g} s); raise busy_timeout, or find the "
            "transaction that stays open"
        )

    def _connection(self) -> LedgerConnection:
        held = self.held
        if held is None:
            held = self.held = open_held(self.path, self.config, shared=True)
        return held.conn

    def _begin(self, tx: Tx, conn: LedgerConnection) -> None:
        pointless = tx.pointless

        def begin() -> None:
            # A probe that meets a busy lock cannot tell: it is waited on like the lock.
            if pointless is not None and pointless():
                raise NothingToWaitFor(tx.op)
            conn.execute(q.BEGIN_IMMEDIATE)

        try:
            try:
                conn.execute(q.BEGIN_IMMEDIATE)
            except sqlite3.Error as exc:
                if not is_busy(exc):
                    raise
                patiently(tx.conn.wait_limit, begin)
        except sqlite3.Error as exc:
            raise translate(exc, tx.op) from exc
        self.open = True
        self.epoch += 1
        self.members = 0
        self.opened = time.monotonic()

    # -- leaving --------------------------------------------------------------------------

    def exit(self, tx: Tx, exc: BaseException | None) -> None:
        """End ``tx``'s membership: keep or undo its writes, then return once the group's
        COMMIT is settled; raise ``tx``'s own error, or the COMMIT's failure."""
        cast(GroupedConnection, tx.conn).route = None
        own = exc
        if own is None:
            try:
                if failpoint.ARMED:
                    failpoint.hit(tx.names[1])
                    if not tx.first:
                        failpoint.hit("group.in_savepoint")
                if not tx.first:
                    self._connection().execute(q.RELEASE_MEMBER)
            except BaseException as err:
                own = err
        if own is not None:
            self._undo(tx, own)
        failure = self._leave(tx)
        if own is not None:
            if not isinstance(own, Exception) or failure is None:
                if isinstance(own, sqlite3.Error):
                    raise translate(own, tx.op) from own
                if own is not exc:
                    raise own
                return  # the with statement raises exc itself
            raise self._failed(tx, failure) from own
        if failure is not None:
            raise self._failed(tx, failure)
        if tx.events and telemetry.history_wanted():
            emit_events(tx.events)
        if failpoint.ARMED:
            failpoint.hit(tx.names[2])

    def _undo(self, tx: Tx, cause: BaseException | None = None) -> None:
        """Roll back ``tx``'s own writes (holding the lock)."""
        conn = self._connection()
        if tx.first:
            # The first member is alone in the transaction: nobody else's writes go.
            rollback_quietly(conn)
            self.open = False
            self._settle(tx.epoch, None)
            return
        try:
            conn.execute(q.ROLLBACK_TO_MEMBER)
            conn.execute(q.RELEASE_MEMBER)
        except sqlite3.Error as err:
            cause = err
        if not conn.in_transaction:
            # SQLite rolled the whole transaction back (disk full, I/O error): the other
            # members' writes went with it, and they must hear so.
            self.open = False
            lost = cause if cause is not None else sqlite3.OperationalError("rolled back")
            self._settle(tx.epoch, lost)

    def _leave(self, tx: Tx) -> BaseException | None:
        """Release the lock, committing the group if it is ``tx``'s turn; then wait for
        the group's commit. Returns the commit's failure, or None once it is durable."""
        if not self.open or self.epoch != tx.epoch:
            self.lock.release()
            with self.mutex:
                return self.failures.get(tx.epoch)
        with self.mutex:
            queued = self.waiting
        if (
            queued == 0
            or self.members >= GROUP_MEMBERS_MAX
            or time.monotonic() - self.opened >= self.window
        ):
            return self._commit()
        self.lock.release()
        return self._await(tx.epoch)

    def _commit(self) -> BaseException | None:
        """COMMIT the open group (holding the lock, which this releases)."""
        epoch = self.epoch
        conn = self._connection()
        failure: BaseException | None = None
        try:
            if failpoint.ARMED:
                failpoint.hit("group.before_commit")
            conn.execute(q.COMMIT)
        except BaseException as err:
            failure = err
            if conn.in_transaction:
                rollback_quietly(conn)
        self.open = False
        self._settle(epoch, failure)
        self.lock.release()
        if failure is None and failpoint.ARMED:
            failpoint.hit("group.after_commit")
        return failure

    def _await(self, epoch: int) -> BaseException | None:
        """Wait until group ``epoch`` is settled; commit it if nobody else does."""
        # Only a group whose queued threads all gave up is left uncommitted: rare, so
        # the member does not give up on the others soon.
        patience = min(max(4 * self.window, AWAIT_PATIENCE), AWAIT_PATIENCE_LONGEST)
        while True:
            with self.mutex:
                if self.settled >= epoch:
                    return self.failures.get(epoch)
                sleeper = threading.Lock()
                sleeper.acquire()
                self.sleepers.append(sleeper)
            if not sleeper.acquire(timeout=patience):
                with self.mutex, suppress(ValueError):
                    self.sleepers.remove(sleeper)
            with self.mutex:
                if self.settled >= epoch:
                    return self.failures.get(epoch)
            # The threads that were queued behind it gave up waiting (nothing to do, or
            # the busy timeout) and nobody committed: commit it from here.
            if self.lock.acquire(timeout=patience):
                if self.open and self.epoch == epoch:
                    return self._commit()
                self.lock.release()

    def _settle(self, epoch: int, failure: BaseException | None) -> None:
        with self.mutex:
            self.settled = epoch
            if failure is not None:
                self.failures[epoch] = failure
                while len(self.failures) > _FAILURES_KEPT:
                    del self.failures[min(self.failures)]
            sleepers, self.sleepers = self.sleepers, []
        for sleeper in sleepers:
            sleeper.release()

    def _failed(self, tx: Tx, failure: BaseException) -> BaseException:
        """What a member raises when the group's COMMIT failed: its write is not durable."""
        if isinstance(failure, failpoint.Crash):
            return failpoint.Crash(failure.name)
        if isinstance(failure, sqlite3.Error):
            return translate(failure, tx.op)
        return StorageError(
            f"{tx.op}: the group transaction that carried this write did not commit "
            f"({type(failure).__name__}: {failure}); nothing of this call was written; "
            "retry it"
        )

    def close(self) -> None:
        """Close the group's connection (when no store of the process uses it)."""
        held, self.held = self.held, None
        if held is not None and held.pid == os.getpid():
            held.conn.close()


_GROUPS: dict[tuple[str, str, float], Group] = {}
_GROUPS_LOCK = threading.Lock()


def acquire(path: Path, config: Config) -> Group:
    """The group of this process for ``path``, ``config``'s ``synchronous`` setting and
    its window, with one more user; pair every call with :func:`release`."""
    key = (os.path.realpath(path), config.sqlite_synchronous, config.sqlite_group_window)
    with _GROUPS_LOCK:
        group = _GROUPS.get(key)
        if group is None or group.pid != os.getpid():
            group = _GROUPS[key] = Group(key, Path(path), config)
        group.users += 1
        return group


def release(group: Group) -> None:
    """One user fewer; the last one closes the group's connection."""
    with _GROUPS_LOCK:
        group.users -= 1
        if group.users > 0:
            return
        if _GROUPS.get(group.key) is group:
            del _GROUPS[group.key]
    group.close()


def _forget_in_child() -> None:
    # A group copied by fork may be mid-transaction, its lock held by a thread that does
    # not exist here: the child starts with none (its stores acquire fresh ones).
    _GROUPS.clear()
    global _GROUPS_LOCK  # noqa: PLW0603 - a lock held at fork time is replaced, not reused
    _GROUPS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)
