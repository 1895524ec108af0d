"""``AsyncStore``: the ``Store`` API as coroutines, for code running on an event loop.

Every method has the sync store's name, arguments, results and errors; its blocking
transaction runs on the store's own thread (:class:`impl.aio.thread.StoreThread`), so the
loop stays free. ``run_effect`` takes an ``async def fn(ctx)``: its durable steps run on
the store's thread and ``fn`` (and an async or sync ``on_doubt`` probe) runs on the loop,
between them, driven through the backend's own step generator
(:mod:`model.effectstep`), so the async face decides nothing the sync one does not.

**Cancellation** (the model's rule, model/SEMANTICS.md "Async face"): a call cancelled
while its durable step runs waits for the step and then raises ``CancelledError``, so it
committed whole or not at all. A ``run_effect`` cancelled while ``fn`` runs leaves the
effect as a crash there would: its start stays (it is *not* removed as for an exception
from ``fn``) and the op is in doubt once the lease ends.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Literal, Self, TypeVar, cast

from attrs import frozen

from impl.aio.thread import StoreThread
from impl.store import open_store as open_sync_store
from model.breaker import BreakerRow
from model.clock import Clock
from model.config import Config
from model.effectstep import EffectSteps, Probe, RunFn, SteppedStore
from model.errors import InvalidInput, StorageError
from model.key import Scalar
from model.record import (
    JSON,
    DoubtInfo,
    EffectContext,
    EffectInfo,
    HistoryEvent,
    JobInfo,
    Lease,
    LeaseRow,
    Plan,
    ReconcileReport,
    Stats,
)
from model.retention import PRUNE_BATCH_DEFAULT, ArchiveFn, ProgressFn, PruneReport
from model.store import OnDoubt
from model.workflow import Workflow

T = TypeVar("T")

AsyncEffectFn = Callable[[EffectContext], Awaitable[JSON]]
"""An async effect: ``async def fn(ctx)`` returning the JSON result to record."""

AsyncOnDoubt = Literal["retry", "raise"] | Callable[[DoubtInfo], Awaitable[JSON] | JSON]
"""``on_doubt`` for the async face: a probe may be ``async def`` or a plain function."""

POSTGRES_THREADS = 8
"""Threads running PostgreSQL steps: its store is thread-safe over a pool of up to 8
connections (impl.postgres.database.POOL_MAX_SIZE), so as many steps may wait on the
server at once. Measured with 256 tasks under load: 8 threads 0.018 of ideal, 4 threads
0.013 (medians of three, alternated)."""


@frozen
class _Done:
    """The step generator returned: ``value`` is the effect's result."""

    value: JSON


def _advance(
    steps: EffectSteps, reply: object, error: BaseException | None
) -> RunFn | Probe | _Done:
    """Run the generator's next durable step (on the store's thread)."""
    try:
        return steps.throw(error) if error is not None else steps.send(reply)
    except StopIteration as stop:
        # StopIteration cannot cross a future; the result travels wrapped.
        return _Done(stop.value)


class AsyncStore:
    """The async face of one store (CONTRACT section 7). Use ``async with``.

    Args:
        make: opens the sync store; called on the store's thread.
        threads: how many threads run the store's steps (1 for SQLite and the model).
    """

    def __init__(self, make: Callable[[], SteppedStore], *, threads: int = 1) -> None:
        self._make = make
        self._threads = threads
        self._thread: StoreThread | None = None
        self._store: SteppedStore | None = None

    async def open(self) -> Self:
        """Open the store (on its own thread); ``async with`` calls this."""
        if self._store is not None:
            return self
        thread = StoreThread(threads=self._threads)
        try:
            self._store = await thread.call(self._make)
        except BaseException:
            thread.shutdown()
            raise
        self._thread = thread
        return self

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the store and stop its thread; later calls raise ``StorageError``."""
        thread, store = self._thread, self._store
        if thread is None or store is None:
            return
        self._thread = self._store = None
        try:
            await thread.call(store.close)
        finally:
            thread.shutdown()

    @property
    def sync(self) -> SteppedStore:
        """The sync store underneath; call it only from its thread (see :meth:`call`).

        Raises:
            StorageError: the async store is not open (never opened, or closed).
        """
        if self._store is None:
            raise StorageError(
                "the async store is not open (not yet, or closed already): open it with "
                "'async with impl.aio.open_store(target) as store:' and use it inside the block"
            )
        return self._store

    def _steps_thread(self) -> StoreThread:
        self.sync  # noqa: B018  (raises the clear error when not open)
        assert self._thread is not None
        return self._thread

    @property
    def config(self) -> Config:
        """The store's effective configuration."""
        return self.sync.config

    async def call(self, fn: Callable[[SteppedStore], T]) -> T:
        """Run ``fn(sync_store)`` on the store's thread: an escape hatch for sync code."""
        store = self.sync
        return await self._steps_thread().call(lambda: fn(store))

    # -- the Store methods, as coroutines -----------------------------------------------

    async def register(self, workflow: Workflow) -> None:
        """See ``Store.register``."""
        await self.call(lambda s: s.register(workflow))

    async def workflow(self, name: str) -> Workflow:
        """See ``Store.workflow``."""
        return await self.call(lambda s: s.workflow(name))

    async def workflows(self) -> list[Workflow]:
        """See ``Store.workflows``."""
        return await self.call(lambda s: s.workflows())

    async def plan(
        self,
        kind: str,
        identity: Mapping[str, Scalar],
        *,
        payload: JSON = None,
        priority: int = 0,
        max_attempts: int | None = None,
        run_at: float | None = None,
    ) -> str:
        """See ``Store.plan``."""
        return await self.call(
            lambda s: s.plan(
                kind,
                identity,
                payload=payload,
                priority=priority,
                max_attempts=max_attempts,
                run_at=run_at,
            )
        )

    async def plan_many(self, kind: str, items: Iterable[Mapping[str, Scalar] | Plan]) -> list[str]:
        """See ``Store.plan_many``."""
        return await self.call(lambda s: s.plan_many(kind, items))

    async def lease_next(
        self, worker: str, *, ttl: float | None = None, kinds: Sequence[str] | None = None
    ) -> Lease | None:
        """See ``Store.lease_next``."""
        return await self.call(lambda s: s.lease_next(worker, ttl=ttl, kinds=kinds))

    async def renew(self, lease: Lease, *, ttl: float | None = None) -> Lease:
        """See ``Store.renew``."""
        return await self.call(lambda s: s.renew(lease, ttl=ttl))

    async def release(self, lease: Lease, *, delay: float = 0.0, reason: str | None = None) -> None:
        """See ``Store.release``."""
        await self.call(lambda s: s.release(lease, delay=delay, reason=reason))

    async def wait_for_work(self, timeout: float, *, kinds: Sequence[str] | None = None) -> bool:
        """See ``Store.wait_for_work``: True once a job of ``kinds`` is eligible.

        The wait blocks a thread of its own, never the store's (whose other calls go on)
        nor the loop; cancelling the awaiting task ends that wait at once.
        """
        store = await self.call(lambda s: s)
        stop = threading.Event()
        try:
            return await asyncio.to_thread(store.wait_for_work, timeout, kinds=kinds, stop=stop)
        finally:
            stop.set()

    async def prune(
        self,
        *,
        finished_before: float,
        keep_failed: bool = False,
        forget_keys: bool = False,
        dry_run: bool = False,
        batch_size: int = PRUNE_BATCH_DEFAULT,
        limit: int | None = None,
        archive: ArchiveFn | None = None,
        progress: ProgressFn | None = None,
    ) -> PruneReport:
        """See ``Store.prune``. ``archive`` and ``progress`` are plain functions: they run
        on the store's thread, between a batch's reads and its delete, as they must, so
        they must not call this store (that call would wait for the prune it is part of)."""
        return await self.call(
            lambda s: s.prune(
                finished_before=finished_before,
                keep_failed=keep_failed,
                forget_keys=forget_keys,
                dry_run=dry_run,
                batch_size=batch_size,
                limit=limit,
                archive=archive,
                progress=progress,
            )
        )

    async def advance(self, lease: Lease, to_state: str) -> bool:
        """See ``Store.advance``."""
        return await self.call(lambda s: s.advance(lease, to_state))

    async def run_effect(
        self,
        lease: Lease,
        op: str,
        fn: AsyncEffectFn,
        *,
        extras: Mapping[str, Scalar] | None = None,
        on_doubt: AsyncOnDoubt = "retry",
    ) -> JSON:
        """See ``Store.run_effect``; ``fn`` is ``async def fn(ctx)`` and runs on the loop.

        Raises:
            The sync store's errors, and ``fn``'s own exception (its start removed).
            ``CancelledError`` while ``fn`` runs leaves the start behind (module doc).
        """
        held: list[EffectSteps] = []
        # The steps only look at on_doubt ("raise", "retry" or callable); the probe
        # itself, sync or async, is called here, on the loop.
        mode = cast(OnDoubt, on_doubt)

        def first() -> RunFn | Probe | _Done:
            steps = self.sync.effect_steps(lease, op, extras=extras, on_doubt=mode)
            held.append(steps)
            return _advance(steps, None, None)

        thread = self._steps_thread()
        try:
            step = await thread.call(first)
            steps = held[0]
            while not isinstance(step, _Done):
                reply: object = None
                error: BaseException | None = None
                if isinstance(step, RunFn):
                    try:
                        reply = await _awaited(fn(step.context), "fn")
                    except Exception as exc:
                        error = exc  # the generator removes the start and re-raises it
                else:
                    assert callable(on_doubt)
                    probed = on_doubt(step.info)
                    reply = await probed if inspect.isawaitable(probed) else probed
                step = await thread.call(functools.partial(_advance, steps, reply, error))
            return step.value
        finally:
            # Stopped at a yield (cancelled, or the probe raised): close the generator
            # there, running no durable step, so a recorded start stays.
            for steps in held:
                steps.close()

    async def fail(
        self, lease: Lease, error: str, *, retryable: bool = True, delay: float | None = None
    ) -> None:
        """See ``Store.fail``."""
        await self.call(lambda s: s.fail(lease, error, retryable=retryable, delay=delay))

    async def cancel(self, job_id: str, reason: str) -> None:
        """See ``Store.cancel``."""
        await self.call(lambda s: s.cancel(job_id, reason))

    async def retry(self, job_id: str) -> None:
        """See ``Store.retry``."""
        await self.call(lambda s: s.retry(job_id))

    async def state(self, job_id: str) -> str:
        """See ``Store.state``."""
        return await self.call(lambda s: s.state(job_id))

    async def job(self, job_id: str) -> JobInfo:
        """See ``Store.job``."""
        return await self.call(lambda s: s.job(job_id))

    async def jobs(
        self,
        *,
        state: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[JobInfo]:
        """See ``Store.jobs``."""
        return await self.call(
            lambda s: s.jobs(state=state, kind=kind, limit=limit, newest_first=newest_first)
        )

    async def leases(self) -> list[LeaseRow]:
        """See ``Store.leases``."""
        return await self.call(lambda s: s.leases())

    async def effects(self, job_id: str) -> list[EffectInfo]:
        """See ``Store.effects``."""
        return await self.call(lambda s: s.effects(job_id))

    async def history(self, job_id: str) -> list[HistoryEvent]:
        """See ``Store.history``."""
        return await self.call(lambda s: s.history(job_id))

    async def reconcile(self, *, dry_run: bool = False) -> ReconcileReport:
        """See ``Store.reconcile``."""
        return await self.call(lambda s: s.reconcile(dry_run=dry_run))

    async def stats(self) -> Stats:
        """See ``Store.stats``."""
        return await self.call(lambda s: s.stats())

    async def record_breaker(
        self,
        host: str,
        *,
        worker: str,
        state: str,
        failures: int,
        last_error: str | None = None,
        cooldown: float | None = None,
    ) -> None:
        """See ``Store.record_breaker``."""
        await self.call(
            lambda s: s.record_breaker(
                host,
                worker=worker,
                state=state,
                failures=failures,
                last_error=last_error,
                cooldown=cooldown,
            )
        )

    async def breakers(self) -> list[BreakerRow]:
        """See ``Store.breakers``."""
        return await self.call(lambda s: s.breakers())

    async def forget_breakers(self, *, changed_before: float) -> int:
        """See ``Store.forget_breakers``."""
        return await self.call(lambda s: s.forget_breakers(changed_before=changed_before))

    async def now(self) -> float:
        """See ``Store.now`` (on PostgreSQL without a clock, a round trip)."""
        return await self.call(lambda s: s.now())


async def _awaited(result: Awaitable[JSON] | JSON, what: str) -> JSON:
    if not inspect.isawaitable(result):
        raise InvalidInput(
            f"the async store's run_effect needs an async {what} (async def fn(ctx)), "
            f"but it returned {type(result).__name__} instead of an awaitable; "
            "use the sync store for a sync function"
        )
    done: JSON = await result
    return done


def open_store(
    target: str | os.PathLike[str],
    *,
    clock: Clock | None = None,
    config: Config | None = None,
) -> AsyncStore:
    """The async face of ``impl.open_store``: ``async with open_store(target) as store:``.

    The store opens (creating and migrating if needed) on its own thread when the
    ``async with`` block is entered; errors are ``impl.open_store``'s.
    """
    text = os.fspath(target)
    postgres = isinstance(text, str) and text.startswith(("postgresql://", "postgres://"))

    def make() -> SteppedStore:
        # Every backend open_store returns has effect_steps (the model's, SQLite's,
        # PostgreSQL's); the Store protocol does not promise it to other implementations.
        return cast(SteppedStore, open_sync_store(target, clock=clock, config=config))

    return AsyncStore(make, threads=POSTGRES_THREADS if postgres else 1)
