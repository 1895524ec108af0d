"""``StoreThread``: the thread(s) that own a sync store for the event loop.

An event loop must never block, and every durable step of jobledger is a blocking
database transaction. A :class:`StoreThread` runs those steps on its own thread(s) (one
for SQLite, whose connections belong to the thread that opened them; a few for
PostgreSQL, whose store is thread-safe over a connection pool) and hands each result
back to the loop through a future.

**Cancellation.** A step handed to the thread runs to its end: a cancelled caller waits
for it (cancelling again does not cut the wait short) and then raises
``CancelledError``. So a cancelled call either committed or did nothing, never half, and
nothing of it is still running once the cancellation has propagated; the step's result is
dropped, as if the process had died right after the commit. Since the step is handed over
when the caller first runs, "did nothing" happens only to a task cancelled before it ever
ran.
"""

from __future__ import annotations

import _thread
import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")

_Work = tuple[Callable[[], object], "Future[object]"] | None


class StoreThread:
    """The thread(s) that run a store's blocking steps for an event loop.

    Starting and stopping them never waits, so both may happen on the loop: the threads
    are started with ``_thread.start_new_thread``, which (unlike ``Thread.start`` and so
    ``ThreadPoolExecutor``) does not wait for the new thread to run, and
    :meth:`shutdown` only asks them to leave once the work handed over is done (under
    load a thread start alone blocked a loop for 0.055 s in a test run).

    Args:
        threads: how many threads; 1 keeps every step on one thread (SQLite).
    """

    def __init__(self, *, threads: int = 1) -> None:
        self._queue: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        self._threads = threads
        for _ in range(threads):
            _thread.start_new_thread(self._work, ())

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            _run_item(*item)

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Hand ``fn`` to a thread; its future holds the result or the exception."""
        future: Future[T] = Future()
        future.set_running_or_notify_cancel()  # handed over: it will run, whatever happens
        self._queue.put((fn, future))  # type: ignore[arg-type]
        return future

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the store's thread and return its result (see module doc)."""
        return await settled(self.submit(fn))

    def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the store's thread and wait for it, from outside any loop."""
        return self.submit(fn).result()

    def shutdown(self) -> None:
        """Let the threads leave once the steps already handed over have run."""
        for _ in range(self._threads):
            self._queue.put(None)


async def settled(future: Future[T]) -> T:
    """Await a step handed over as ``future``; a cancelled caller waits for the step to
    end, then raises ``CancelledError`` (see module doc)."""
    waiter = asyncio.wrap_future(future)
    try:
        return await asyncio.shield(waiter)
    except asyncio.CancelledError:
        await outlast(waiter)
        raise


class SideQueue:
    """Steps run by a thread that is busy inside another step, while it waits.

    A prune hands each batch to a callback on the loop and waits for it with the batch's
    transaction open; the calls that callback makes to the store must run inside the
    prune, on the prune's thread, as a sync callback's calls do (a thread waiting for
    its own callback cannot take them from the store's queue: that was a deadlock).
    The waiting thread runs them (:meth:`serve_until`); once the callback is done the
    queue closes and :meth:`submit` answers None, so a late caller goes to the store's
    own queue.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = True
        self._queue: queue.SimpleQueue[_Work] = queue.SimpleQueue()

    def submit(self, fn: Callable[[], T]) -> Future[T] | None:
        """Hand ``fn`` to the waiting thread; None once it stopped waiting."""
        with self._lock:
            if not self._open:
                return None
            future: Future[T] = Future()
            future.set_running_or_notify_cancel()
            self._queue.put((fn, future))  # type: ignore[arg-type]
            return future

    def serve_until(self, done: Future[object]) -> None:
        """Run the steps handed over until ``done`` is done (call it on the waiting
        thread), then close: steps already handed over still run, later ones do not come."""
        done.add_done_callback(lambda _: self._queue.put(None))
        while (item := self._queue.get()) is not None:
            _run_item(*item)
        with self._lock:
            self._open = False
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                _run_item(*item)


def _run_item(fn: Callable[[], object], future: Future[object]) -> None:
    try:
        result = fn()
    except BaseException as exc:  # a failpoint's crash travels to the caller too
        future.set_exception(exc)
    else:
        future.set_result(result)


async def outlast(waiter: asyncio.Future[T]) -> None:
    """Wait until ``waiter`` is done, whatever cancellations arrive meanwhile (its result
    or exception is dropped: the caller is cancelled already)."""
    while not waiter.done():
        try:
            await asyncio.shield(waiter)
        except asyncio.CancelledError:
            continue
        except BaseException:
            return
    if not waiter.cancelled():
        waiter.exception()  # retrieved, so asyncio does not report it as lost
