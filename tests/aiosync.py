"""A sync ``Store`` over ``impl.aio``'s async store, so the conformance suite drives the
async face unchanged: each call is a coroutine run on an event loop in its own thread.

The loop runs in asyncio's debug mode with a small slow-callback threshold, watched by
:class:`tests.loopwatch.LoopWatch`; :meth:`LoopThread.close` returns every report of a
blocked loop, and the fixture fails the test if there was one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from impl.aio.store import AsyncStore
from model import (
    JSON,
    Config,
    DoubtInfo,
    EffectContext,
    EffectInfo,
    HistoryEvent,
    JobInfo,
    Lease,
    LeaseRow,
    Plan,
    ReconcileReport,
    Scalar,
    Stats,
    Workflow,
)
from model.breaker import BreakerRow
from model.retention import PruneReport
from model.store import EffectFn, OnDoubt
from tests.loopwatch import LoopWatch

T = TypeVar("T")

STOP_POLL = 0.005
"""Seconds between looks at a ``wait_for_work`` stop event (the sync stores notice theirs
at once; a test adapter may poll)."""


class LoopThread:
    """An event loop in debug mode running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.watch = LoopWatch()
        self.watch.attach(self.loop)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result from this thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> list[str]:
        """Stop the loop; return the reports of a blocked loop."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
        return self.watch.close()


class SyncFace:
    """The ``Store`` protocol, each call made through an :class:`AsyncStore`."""

    def __init__(self, astore: AsyncStore, loop: LoopThread) -> None:
        self.astore = astore
        self._loop = loop
        loop.run(astore.open())

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        # The call runs in the calling thread's context, as an awaited call runs in its
        # task's: a prune's callback (run on a thread by the async face) calls the store
        # through this adapter, and its calls must be known as the callback's.
        context = contextvars.copy_context()

        async def in_context() -> T:
            for var, value in context.items():
                var.set(value)
            return await coro

        return self._loop.run(in_context())

    @property
    def config(self) -> Config:
        return self.astore.config

    def close(self) -> None:
        self._run(self.astore.close())

    def now(self) -> float:
        return self._run(self.astore.now())

    def register(self, workflow: Workflow) -> None:
        self._run(self.astore.register(workflow))

    def workflow(self, name: str) -> Workflow:
        return self._run(self.astore.workflow(name))

    def workflows(self) -> list[Workflow]:
        return self._run(self.astore.workflows())

    def plan(self, kind: str, identity: Mapping[str, Scalar], **options: Any) -> str:
        return self._run(self.astore.plan(kind, identity, **options))

    def plan_many(self, kind: str, items: Iterable[Mapping[str, Scalar] | Plan]) -> list[str]:
        return self._run(self.astore.plan_many(kind, items))

    def lease_next(
        self, worker: str, *, ttl: float | None = None, kinds: Sequence[str] | None = None
    ) -> Lease | None:
        return self._run(self.astore.lease_next(worker, ttl=ttl, kinds=kinds))

    def renew(self, lease: Lease, *, ttl: float | None = None) -> Lease:
        return self._run(self.astore.renew(lease, ttl=ttl))

    def release(self, lease: Lease, *, delay: float = 0.0, reason: str | None = None) -> None:
        self._run(self.astore.release(lease, delay=delay, reason=reason))

    def wait_for_work(
        self,
        timeout: float,
        *,
        kinds: Sequence[str] | None = None,
        stop: threading.Event | None = None,
    ) -> bool:
        # The async face has no stop event: a waiting task is stopped by cancelling it.
        # So a set ``stop`` cancels the wait's task, and the answer is the sync one's
        # (False). The adapter used to check ``stop`` only before the wait and then waited
        # out the timeout, which made the stop-event test wait 30 s per backend.
        future = asyncio.run_coroutine_threadsafe(
            self.astore.wait_for_work(timeout, kinds=kinds), self._loop.loop
        )
        if stop is None:
            return future.result()
        while not stop.wait(STOP_POLL):
            try:
                return future.result(timeout=0)
            except concurrent.futures.TimeoutError:
                continue
        future.cancel()
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            return False

    def prune(self, **options: Any) -> PruneReport:
        return self._run(self.astore.prune(**options))

    def advance(self, lease: Lease, to_state: str) -> bool:
        return self._run(self.astore.advance(lease, to_state))

    def run_effect(
        self,
        lease: Lease,
        op: str,
        fn: EffectFn,
        *,
        extras: Mapping[str, Scalar] | None = None,
        on_doubt: OnDoubt = "retry",
        then: str | None = None,
    ) -> JSON:
        # The test's sync fn (and probe) may call this store again, so it runs on a
        # thread of its own while the loop awaits it, as an async fn awaits I/O.
        async def afn(ctx: EffectContext) -> JSON:
            return await asyncio.to_thread(fn, ctx)

        probe: Any = on_doubt
        if callable(on_doubt):
            sync_probe: Callable[[DoubtInfo], JSON] = on_doubt

            async def probe(info: DoubtInfo) -> JSON:
                return await asyncio.to_thread(sync_probe, info)

        return self._run(
            self.astore.run_effect(lease, op, afn, extras=extras, on_doubt=probe, then=then)
        )

    def fail(
        self, lease: Lease, error: str, *, retryable: bool = True, delay: float | None = None
    ) -> None:
        self._run(self.astore.fail(lease, error, retryable=retryable, delay=delay))

    def cancel(self, job_id: str, reason: str) -> None:
        self._run(self.astore.cancel(job_id, reason))

    def retry(self, job_id: str) -> None:
        self._run(self.astore.retry(job_id))

    def state(self, job_id: str) -> str:
        return self._run(self.astore.state(job_id))

    def job(self, job_id: str) -> JobInfo:
        return self._run(self.astore.job(job_id))

    def jobs(self, **options: Any) -> list[JobInfo]:
        return self._run(self.astore.jobs(**options))

    def leases(self) -> list[LeaseRow]:
        return self._run(self.astore.leases())

    def effects(self, job_id: str) -> list[EffectInfo]:
        return self._run(self.astore.effects(job_id))

    def history(self, job_id: str) -> list[HistoryEvent]:
        return self._run(self.astore.history(job_id))

    def reconcile(self, *, dry_run: bool = False) -> ReconcileReport:
        return self._run(self.astore.reconcile(dry_run=dry_run))

    def stats(self) -> Stats:
        return self._run(self.astore.stats())

    def record_breaker(self, host: str, **options: Any) -> None:
        self._run(self.astore.record_breaker(host, **options))

    def breakers(self) -> list[BreakerRow]:
        return self._run(self.astore.breakers())

    def forget_breakers(self, *, changed_before: float) -> int:
        return self._run(self.astore.forget_breakers(changed_before=changed_before))
