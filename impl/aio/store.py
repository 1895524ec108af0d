"""``AsyncStore``: the ``Store`` API as coroutines, for code running on an event loop.

Every method has the sync store's name, arguments, results and errors; its blocking
transaction runs on the store's own thread (:class:`impl.aio.thread.StoreThread`), so the
loop stays free. ``run_effect`` takes an ``async def fn(ctx)``: its durable steps run on
the store's thread and ``fn`` (and an async or sync ``on_doubt`` probe) runs on the loop,
between them, driven through the backend's own step generator
(:mod:`model.effectstep`), so the async face decides nothing the sync one does not.

On PostgreSQL the hot path (``plan``, ``plan_many``, ``lease_next``, ``renew``,
``release``, ``advance``, ``fail``, ``run_effect``) runs natively on an async connection
pool instead, driving the sync store's own transaction steps (:mod:`impl.aio.native`).

**Cancellation** (the model's rule, model/SEMANTICS.md "Async face"): a call cancelled
while its durable step runs waits for the step and then raises ``CancelledError``, so it
committed whole or not at all. A ``run_effect`` cancelled while ``fn`` runs leaves the
effect as a crash there would: its start stays (it is *not* removed as for an exception
from ``fn``) and the op is in doubt once the lease ends.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self, TypeVar, cast

from attrs import frozen

from impl.aio.thread import SideQueue, StoreThread, settled
from impl.aio.userfn import awaited_result
from impl.store import open_store as open_sync_store
from model.breaker import BreakerRow
from model.clock import Clock
from model.config import Config
from model.effectstep import EffectSteps, Probe, RunFn, SteppedStore
from model.errors import StorageError
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
from model.retention import PRUNE_BATCH_DEFAULT, PrunedJob, PruneReport
from model.store import OnDoubt
from model.workflow import Workflow

if TYPE_CHECKING:
    from impl.aio.native import NativePostgres

T = TypeVar("T")
V = TypeVar("V")

AsyncArchiveFn = Callable[[Sequence[PrunedJob]], Awaitable[None] | None]
"""``archive`` for the async face's prune: ``async def`` or plain (see AsyncStore.prune)."""

AsyncProgressFn = Callable[[PruneReport], Awaitable[None] | None]
"""``progress`` for the async face's prune: ``async def`` or plain."""

_INSIDE: contextvars.ContextVar[tuple[AsyncStore, SideQueue] | None] = contextvars.ContextVar(
    "jobledger_aio_inside_prune", default=None
)
"""Set in the task running a prune's callback: its calls to that store go to the prune."""

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
        native: on PostgreSQL, run the hot path natively on an async connection pool
            (:mod:`impl.aio.native`); False keeps every call on the threads.
    """

    def __init__(
        self, make: Callable[[], SteppedStore], *, threads: int = 1, native: bool = True
    ) -> None:
        self._make = make
        self._threads = threads
        self._thread: StoreThread | None = None
        self._store: SteppedStore | None = None
        self._use_native = native
        self._native: NativePostgres | None = None

    async def open(self) -> Self:
        """Open the store (on its own thread); ``async with`` calls this."""
        if self._store is not None:
            return self
        thread = StoreThread(threads=self._threads)
        try:
            store = await thread.call(self._make)
            try:
                # Built on the thread too: its first import (psycopg's async pool) took
                # 0.35 s on a loaded machine, far too long for the loop.
                native = (
                    await thread.call(functools.partial(_native_for, store))
                    if self._use_native
                    else None
                )
                if native is not None:
                    await native.open()
            except BaseException:
                await thread.call(store.close)
                raise
        except BaseException:
            thread.shutdown()
            raise
        self._store, self._native, self._thread = store, native, thread
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
        thread, store, native = self._thread, self._store, self._native
        if thread is None or store is None:
            return
        self._thread = self._store = self._native = None
        try:
            if native is not None:
                await native.close()
        finally:
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

    def _native_here(self) -> NativePostgres | None:
        """The native path if this loop is the one its pool belongs to, else None (the
        call then takes the thread path, which any loop may use: a store opened in one
        ``asyncio.run`` and used in later ones)."""
        native = self._native
        if native is None or native.loop is not asyncio.get_running_loop():
            return None
        return native

    @property
    def native(self) -> bool:
        """Whether the hot path runs natively on async connections (PostgreSQL) rather
        than on the store's threads (see impl.aio.native)."""
        self.sync  # noqa: B018  (raises the clear error when not open)
        return self._native is not None

    @property
    def config(self) -> Config:
        """The store's effective configuration."""
        return self.sync.config

    async def call(self, fn: Callable[[SteppedStore], T]) -> T:
        """Run ``fn(sync_store)`` on the store's thread: an escape hatch for sync code."""
        store = self.sync
        return await self._step(lambda: fn(store))

    async def _step(self, fn: Callable[[], T]) -> T:
        """Run one durable step: on the store's thread, or, for a call made by a prune's
        callback (its task and what it starts), on the prune's thread, inside the prune."""
        thread = self._steps_thread()
        side = _INSIDE.get()
        if side is not None and side[0] is self:
            future = side[1].submit(fn)
            if future is not None:
                return await settled(future)
        return await thread.call(fn)

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
        native = self._native_here()
        if native is not None:
            item = Plan(
                identity,
                payload=payload,
                priority=priority,
                max_attempts=max_attempts,
                run_at=run_at,
            )
            return (await native.transact(native.store.plan_tx("plan", kind, [item])))[0]
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
        native = self._native_here()
        if native is not None:
            plans = [i if isinstance(i, Plan) else Plan(i) for i in items]
            return await native.transact(native.store.plan_tx("plan_many", kind, plans))
        return await self.call(lambda s: s.plan_many(kind, items))

    async def lease_next(
        self, worker: str, *, ttl: float | None = None, kinds: Sequence[str] | None = None
    ) -> Lease | None:
        """See ``Store.lease_next``."""
        native = self._native_here()
        if native is not None:
            return await native.transact(native.store.lease_next_tx(worker, ttl=ttl, kinds=kinds))
        return await self.call(lambda s: s.lease_next(worker, ttl=ttl, kinds=kinds))

    async def renew(self, lease: Lease, *, ttl: float | None = None) -> Lease:
        """See ``Store.renew``."""
        native = self._native_here()
        if native is not None:
            return await native.transact(native.store.renew_tx(lease, ttl=ttl))
        return await self.call(lambda s: s.renew(lease, ttl=ttl))

    async def release(self, lease: Lease, *, delay: float = 0.0, reason: str | None = None) -> None:
        """See ``Store.release``."""
        native = self._native_here()
        if native is not None:
            await native.transact(native.store.release_tx(lease, delay=delay, reason=reason))
            return
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
        archive: AsyncArchiveFn | None = None,
        progress: AsyncProgressFn | None = None,
    ) -> PruneReport:
        """See ``Store.prune``; ``archive`` and ``progress`` may be ``async def`` or plain.

        Each batch's jobs go to ``archive`` before the batch's delete commits, as on the
        sync store: the prune's thread waits, the batch's transaction open, while the
        callback runs off that thread (an ``async def`` on the loop, a plain function on a
        thread of its own, never on the loop: it writes and fsyncs). The callback may call
        this store: its calls (and those of tasks and threads it starts) run on the
        prune's thread inside the prune, and see the batch not yet deleted, as a sync
        callback's calls do. It must not wait for *other* tasks' calls to this store:
        those wait for the batch, as other threads wait for a sync prune.
        """
        loop = asyncio.get_running_loop()
        return await self.call(
            lambda s: s.prune(
                finished_before=finished_before,
                keep_failed=keep_failed,
                forget_keys=forget_keys,
                dry_run=dry_run,
                batch_size=batch_size,
                limit=limit,
                archive=None if archive is None else self._hand_over(loop, archive),
                progress=None if progress is None else self._hand_over(loop, progress),
            )
        )

    def _hand_over(
        self, loop: asyncio.AbstractEventLoop, callback: Callable[[V], Awaitable[None] | None]
    ) -> Callable[[V], None]:
        """A sync callback for the sync prune (on the prune's thread) that runs
        ``callback`` off that thread and runs its store calls meanwhile (see prune)."""

        def on_prune_thread(value: V) -> None:
            side = SideQueue()

            async def run() -> None:
                _INSIDE.set((self, side))  # this task's context, and what it starts
                if _is_async(callback):
                    result = callback(value)
                else:
                    result = await asyncio.to_thread(callback, value)
                if inspect.isawaitable(result):
                    await result

            done = asyncio.run_coroutine_threadsafe(run(), loop)
            side.serve_until(cast("Future[object]", done))
            done.result()  # the callback's exception rolls the batch back

        return on_prune_thread

    async def advance(self, lease: Lease, to_state: str) -> bool:
        """See ``Store.advance``."""
        native = self._native_here()
        if native is not None:
            return await native.transact(native.store.advance_tx(lease, to_state))
        return await self.call(lambda s: s.advance(lease, to_state))

    async def run_effect(
        self,
        lease: Lease,
        op: str,
        fn: AsyncEffectFn,
        *,
        extras: Mapping[str, Scalar] | None = None,
        on_doubt: AsyncOnDoubt = "retry",
        then: str | None = None,
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
        native = self._native_here()
        if native is not None:
            return await native.run_effect(
                lease,
                op,
                fn,
                extras=extras,
                on_doubt=mode,
                probe=on_doubt if callable(on_doubt) else None,
                then=then,
            )

        def first() -> RunFn | Probe | _Done:
            steps = self.sync.effect_steps(lease, op, extras=extras, on_doubt=mode, then=then)
            held.append(steps)
            return _advance(steps, None, None)

        try:
            step = await self._step(first)
            steps = held[0]
            while not isinstance(step, _Done):
                reply: object = None
                error: BaseException | None = None
                if isinstance(step, RunFn):
                    try:
                        reply = await awaited_result(fn(step.context), "fn")
                    except Exception as exc:
                        error = exc  # the generator removes the start and re-raises it
                else:
                    assert callable(on_doubt)
                    probed = on_doubt(step.info)
                    reply = await probed if inspect.isawaitable(probed) else probed
                step = await self._step(functools.partial(_advance, steps, reply, error))
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
        native = self._native_here()
        if native is not None:
            await native.transact(
                native.store.fail_tx(lease, error, retryable=retryable, delay=delay)
            )
            return
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


def _is_async(fn: object) -> bool:
    """Whether calling ``fn`` makes a coroutine (a function or a callable object)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004
    )


def _native_for(store: SteppedStore) -> NativePostgres | None:
    """The native PostgreSQL path for ``store`` when it is a PostgreSQL store."""
    # Only a PostgreSQL store can be one, and its module is loaded then: psycopg is an
    # optional dependency that a SQLite user need not have.
    module = sys.modules.get("impl.postgres.store")
    if module is None or not isinstance(store, module.PostgresStore):
        return None
    from impl.aio.native import NativePostgres  # noqa: PLC0415

    return NativePostgres(store)


def open_store(
    target: str | os.PathLike[str],
    *,
    clock: Clock | None = None,
    config: Config | None = None,
    native: bool = True,
) -> AsyncStore:
    """The async face of ``impl.open_store``: ``async with open_store(target) as store:``.

    The store opens (creating and migrating if needed) on its own thread when the
    ``async with`` block is entered; errors are ``impl.open_store``'s. On PostgreSQL the
    hot path runs on psycopg's async connections (:mod:`impl.aio.native`) unless
    ``native=False``, which keeps every call on the store's threads.
    """
    text = os.fspath(target)
    postgres = isinstance(text, str) and text.startswith(("postgresql://", "postgres://"))

    def make() -> SteppedStore:
        # Every backend open_store returns has effect_steps (the model's, SQLite's,
        # PostgreSQL's); the Store protocol does not promise it to other implementations.
        return cast(SteppedStore, open_sync_store(target, clock=clock, config=config))

    return AsyncStore(make, threads=POSTGRES_THREADS if postgres else 1, native=native)
