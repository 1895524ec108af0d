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

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class StoreThread:
    """A small executor whose threads run a store's blocking steps for one event loop.

    Args:
        threads: how many threads; 1 keeps every step on one thread (SQLite).
        name: thread name prefix, shown in stack dumps.
    """

    def __init__(self, *, threads: int = 1, name: str = "jobledger-store") -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix=name
        )

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the store's thread and return its result (see module doc)."""
        waiter = asyncio.wrap_future(self._executor.submit(fn))
        try:
            return await asyncio.shield(waiter)
        except asyncio.CancelledError:
            await _outlast(waiter)
            raise

    def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the store's thread and wait for it, from outside any loop."""
        return self._executor.submit(fn).result()

    def shutdown(self) -> None:
        """Stop the threads once the steps already handed over have run."""
        self._executor.shutdown(wait=True)


async def _outlast(waiter: asyncio.Future[T]) -> None:
    """Wait until ``waiter`` is done, whatever cancellations arrive meanwhile."""
    while not waiter.done():
        try:
            await asyncio.shield(waiter)
        except asyncio.CancelledError:
            continue
        except BaseException:
            return
    if not waiter.cancelled():
        waiter.exception()  # retrieved, so asyncio does not report it as lost
