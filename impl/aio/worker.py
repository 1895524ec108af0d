"""``AsyncWorker``: the worker runtime on an event loop, ``concurrency`` tasks at once.

Each of the worker's ``concurrency`` tasks leases a job, awaits ``handler(ctx)`` with an
:class:`AsyncJobContext`, and ends the job as the threaded :class:`impl.Worker` does:
finished when terminal, released when it advanced, failed with backoff on an exception
or when it made no progress, released with a delay and no attempt spent on
:class:`impl.RetryLater`. A renewal task keeps each running job's lease alive.

Stopping, three ways, each releasing the leases it holds as the threaded worker does:
- :meth:`AsyncWorker.stop` (and SIGTERM/SIGINT while :meth:`AsyncWorker.run` runs in the
  main thread): each handler stops at its next ``ctx.effect``/``ctx.advance``, after
  the effect it is running, and its lease is released.
- cancelling the task running :meth:`AsyncWorker.run`: every handler is cancelled where
  it awaits; an effect cut off inside ``fn`` keeps its start (as a crash there would), and
  the lease is released, so the op is in doubt and the job eligible again at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Mapping

from attrs import define, evolve

from impl.aio.store import AsyncEffectFn, AsyncOnDoubt, AsyncStore
from impl.outcome import RetryLater
from impl.worker import (
    IDLE_POLL_DEFAULT,
    NO_PROGRESS_ERROR,
    LeaseView,
    RunReport,
    StopRequested,
    default_worker_name,
)
from model.errors import InvalidInput, JobledgerError, LeaseLost, StorageError
from model.key import Scalar
from model.record import JSON, Lease
from model.validate import storable_text
from model.workflow import Workflow, reached

log = logging.getLogger("jobledger.aio.worker")


@define
class AsyncJobContext(LeaseView):
    """What an async handler receives: the lease, the job's data, and fenced actions.

    ``advance`` and ``effect`` raise :class:`LeaseLost` at once if the renewal task found
    the lease lost, and :class:`StopRequested` if the worker is stopping.
    """

    store: AsyncStore
    lease: Lease
    workflow: Workflow
    stopping: asyncio.Event
    lost: bool = False
    advanced: bool = False
    ended: bool = False  # the worker finished, released or failed the lease

    def _guard(self, op: str) -> Lease:
        if self.stopping.is_set():
            raise StopRequested
        if self.lost:
            raise LeaseLost(
                self.lease.job_id,
                self.lease.token,
                None,
                "the renewal task lost the lease",
                op,
            )
        return self.lease

    async def advance(self, state: str) -> bool:
        """Advance the job along one declared edge (see ``Store.advance``)."""
        moved = await self.store.advance(self._guard("advance"), state)
        if moved:
            self.advanced = True
            self.lease = evolve(self.lease, state=state)
        return moved

    async def effect(
        self,
        op: str,
        fn: AsyncEffectFn,
        *,
        extras: Mapping[str, Scalar] | None = None,
        on_doubt: AsyncOnDoubt = "retry",
        then: str | None = None,
    ) -> JSON:
        """Run an async effect once per op key (see ``Store.run_effect``); with ``then``,
        the job advances to that state in the transaction that records the result."""
        lease = self._guard("run_effect")
        result = await self.store.run_effect(
            lease, op, fn, extras=extras, on_doubt=on_doubt, then=then
        )
        if then is not None and not reached(self.workflow, lease.state, then):
            self.advanced = True
            self.lease = evolve(self.lease, state=then)
        return result

    async def renew(self, *, ttl: float | None = None) -> Lease:
        """Renew the lease now (long effects may call this between chunks)."""
        self.lease = await self.store.renew(self._guard("renew"), ttl=ttl)
        return self.lease

    def is_terminal(self) -> bool:
        """True when the job's workflow says its current state ends it."""
        return self.workflow.is_terminal(self.state)


AsyncHandler = Callable[[AsyncJobContext], Awaitable[object]]
"""An async job handler: ``async def handler(ctx)`` drives one job forward."""


def retry_later_delay(exc: RetryLater, store: AsyncStore) -> float:
    """The release delay for ``RetryLater``: its own, else the first attempt's backoff."""
    return exc.delay if exc.delay is not None else store.config.backoff(1)


class AsyncWorker:
    """Runs async handlers for leased jobs until stopped or, with ``until_idle``, idle.

    Args:
        store: an open :class:`impl.aio.AsyncStore`.
        handlers: kind -> ``async def handler(ctx)``.
        name: worker name for leases; default ``host:pid:n`` (``/i`` per task).
        ttl: lease TTL in seconds; default the store's configured TTL.
        concurrency: tasks on this loop, each leasing its own jobs.
        renew_every: seconds between renewals; default a third of the TTL.
        idle_poll: seconds a task waits when no job is eligible.
    """

    def __init__(
        self,
        store: AsyncStore,
        handlers: Mapping[str, AsyncHandler],
        *,
        name: str | None = None,
        ttl: float | None = None,
        concurrency: int = 1,
        renew_every: float | None = None,
        idle_poll: float = IDLE_POLL_DEFAULT,
    ) -> None:
        if not handlers:
            raise InvalidInput("AsyncWorker needs at least one handler: handlers={'kind': fn}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise InvalidInput(f"concurrency must be an int >= 1, got {concurrency!r}")
        self.store = store
        self.handlers = dict(handlers)
        self._kinds = list(self.handlers)
        self.name = name if name is not None else default_worker_name()
        self.ttl = ttl
        self.concurrency = concurrency
        if renew_every is not None:
            self.renew_every = renew_every
        elif ttl is not None:
            self.renew_every = ttl / 3
        else:
            self.renew_every = store.config.renew_interval
        self.idle_poll = idle_poll
        self._stopping = asyncio.Event()
        self._flows: dict[str, Workflow] = {}
        self._report = RunReport()
        self._idle = [False] * concurrency
        self._wake = asyncio.Condition()
        # One idle task at a time asks the store to wait for work (a thread each would
        # be 256 threads at concurrency=256); it nudges the others when work comes.
        self._watching = False
        self._nudge = asyncio.Event()

    def stop(self) -> None:
        """Ask the worker to stop after the current effect of each running job.

        Call it on the worker's loop (a signal handler installed by :meth:`run` does);
        from another thread use ``loop.call_soon_threadsafe(worker.stop)``.
        """
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called or a stop signal arrived."""
        return self._stopping.is_set()

    def _count(self, **fields: int) -> None:
        for key, value in fields.items():
            setattr(self._report, key, getattr(self._report, key) + value)

    async def _load_flows(self) -> None:
        # Workflows never change once registered (a different one raises), so one read
        # per run serves every job's terminal check; UnknownWorkflow surfaces here.
        for kind in self._kinds:
            if kind not in self._flows:
                self._flows[kind] = await self.store.workflow(kind)

    async def run_once(self, *, name: str | None = None) -> bool:
        """Lease and run one job. Return False when nothing was eligible."""
        await self._load_flows()
        return await self._run_one(name if name is not None else self.name)

    async def _run_one(self, worker: str) -> bool:
        if self._stopping.is_set():
            return False
        lease = await self.store.lease_next(worker, ttl=self.ttl, kinds=self._kinds)
        if lease is None:
            return False
        self._count(jobs=1)
        ctx = AsyncJobContext(self.store, lease, self._flows[lease.kind], self._stopping)
        renewal = asyncio.create_task(self._renew(ctx), name=f"renew {lease.job_id[:12]}")
        try:
            await self._handle(ctx, renewal)
        except asyncio.CancelledError as exc:
            await _stop_renewal(renewal)
            task = asyncio.current_task()
            if task is not None and task.cancelling() == 0 and not ctx.ended:
                # Nobody cancelled this task: the handler let a CancelledError of its own
                # escape (a timeout or cancel scope inside it). That is the handler
                # failing, not the worker stopping.
                await self._fail(ctx, storable_text(f"CancelledError: {exc}"))
                return True
            # The worker is being cancelled: a crash, short of the lease. Giving it back
            # is the graceful part; the durable step runs whole even now (StoreThread).
            if not ctx.ended and not ctx.is_terminal():
                await self._end(ctx)
            raise
        return True

    async def _handle(self, ctx: AsyncJobContext, renewal: asyncio.Task[None]) -> None:
        lease = ctx.lease
        try:
            await self.handlers[lease.kind](ctx)
        except StopRequested:
            await _stop_renewal(renewal)
            await self._end(ctx)
            return
        except RetryLater as exc:
            await _stop_renewal(renewal)
            delay = retry_later_delay(exc, self.store)
            log.warning("job %s: retry later in %g s: %s", lease.job_id, delay, exc.reason)
            await self._end(ctx, delay=delay, reason=storable_text(str(exc.reason)))
            return
        except LeaseLost as exc:
            await _stop_renewal(renewal)
            log.warning("job %s: %s", lease.job_id, exc)
            ctx.ended = True
            self._count(lost=1)
            return
        except Exception as exc:
            await _stop_renewal(renewal)
            retryable = bool(getattr(exc, "retryable", True))
            await self._fail(
                ctx, storable_text(f"{type(exc).__name__}: {exc}"), retryable=retryable
            )
            return
        await _stop_renewal(renewal)
        if ctx.is_terminal():
            self._count(finished=1)
        elif ctx.advanced:
            await self._end(ctx)
        else:
            await self._fail(ctx, NO_PROGRESS_ERROR)

    async def _renew(self, ctx: AsyncJobContext) -> None:
        while True:
            await asyncio.sleep(self.renew_every)
            try:
                ctx.lease = await self.store.renew(ctx.lease, ttl=self.ttl)
            except LeaseLost as exc:
                log.warning("lease lost while the handler ran: %s", exc)
                ctx.lost = True
                return
            except StorageError as exc:
                # Busy or briefly unreachable: the lease survives while one renewal lands.
                log.warning("lease renewal failed, will retry: %s", exc)

    async def _end(
        self, ctx: AsyncJobContext, *, delay: float = 0.0, reason: str | None = None
    ) -> None:
        ctx.ended = True
        try:
            await self.store.release(ctx.lease, delay=delay, reason=reason)
            self._count(released=1)
        except LeaseLost as exc:
            log.warning("job %s: release after the lease was lost: %s", ctx.job_id, exc)
            self._count(lost=1)

    async def _fail(self, ctx: AsyncJobContext, error: str, *, retryable: bool = True) -> None:
        ctx.ended = True
        try:
            await self.store.fail(ctx.lease, error, retryable=retryable)
            self._count(failed=1)
        except LeaseLost as exc:
            log.warning("job %s failed after its lease was lost: %s", ctx.job_id, exc)
            self._count(lost=1)

    async def _serve(self, index: int, until_idle: bool) -> None:
        name = self.name if self.concurrency == 1 else f"{self.name}/{index}"
        while not self._stopping.is_set():
            try:
                did = await self._run_one(name)
            except JobledgerError as exc:
                log.error("worker %s: %s", name, exc)
                did = False
                if not until_idle:
                    await self._pause(self.idle_poll)
                    continue
            async with self._wake:
                self._idle[index] = not did
                if did:
                    # A finished job may have made others eligible: idle tasks look again.
                    self._wake.notify_all()
                elif until_idle and all(self._idle):
                    self._wake.notify_all()
                    return
            if not did:
                if until_idle:
                    async with self._wake:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), self.idle_poll)
                        if all(self._idle):
                            return
                else:
                    await self._idle_wait()

    async def _idle_wait(self) -> None:
        """Wait until work may be there: the store says so, a stop, or ``idle_poll``."""
        if self._watching:
            await self._pause(self.idle_poll)
            return
        self._watching = True
        try:
            found = await self._first(
                self.store.wait_for_work(self.idle_poll, kinds=self._kinds), self.idle_poll
            )
        finally:
            self._watching = False
        if found:
            nudge, self._nudge = self._nudge, asyncio.Event()
            nudge.set()

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if the worker stops or the watching task saw work."""
        await self._first(self._nudge.wait(), seconds)

    async def _first(self, wanted: Awaitable[object], seconds: float) -> bool:
        """Await ``wanted`` for at most ``seconds``, or until a stop; True if it came
        back true first."""
        tasks = [asyncio.ensure_future(wanted), asyncio.ensure_future(self._stopping.wait())]
        try:
            done, _ = await asyncio.wait(
                tasks, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            # Also when this task is cancelled: nothing it started may outlive it.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        first = [t for t in done if not t.cancelled() and t.exception() is None]
        return any(t.result() is True for t in first) and not self._stopping.is_set()

    async def run(self, *, until_idle: bool = False) -> RunReport:
        """Run ``concurrency`` tasks until stopped, cancelled, or (``until_idle``) idle.

        SIGTERM and SIGINT handlers are installed while it runs, if called on the main
        thread's loop, and removed on return. Cancelling the task running this cancels
        every handler and releases their leases before the cancellation propagates.
        """
        await self._load_flows()
        loop = asyncio.get_running_loop()
        previous: dict[signal.Signals, signal._HANDLER] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                # A loop without signal support (NotImplementedError: Windows' proactor)
                # or not able to take them here (RuntimeError) runs without the handlers,
                # as documented: a stop then comes from cancelling the task.
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    handler = signal.getsignal(sig)
                    loop.add_signal_handler(sig, self._on_signal, sig)
                    previous[sig] = handler
        self._idle = [False] * self.concurrency
        started = time.monotonic()
        tasks = [
            asyncio.create_task(self._serve(i, until_idle), name=f"{self.name}/{i}")
            for i in range(self.concurrency)
        ]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                # A cancelled gather has already cancelled each task once; a second
                # cancel could land while a task releases its lease and cut it short.
                if task.cancelling() == 0:
                    task.cancel()
            # Every task releases its lease before it ends; wait for all of them.
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                if handler is not None:  # None: not installed from Python, nothing to restore
                    signal.signal(sig, handler)
        log.info("worker %s ran %.1f s: %s", self.name, time.monotonic() - started, self._report)
        return self._report

    def _on_signal(self, sig: signal.Signals) -> None:
        log.warning("signal %s: stopping after the current effect", sig.name)
        self._stopping.set()


async def _stop_renewal(renewal: asyncio.Task[None]) -> None:
    """Cancel the renewal task and wait until no renewal is in flight."""
    renewal.cancel()
    # wait() does not raise the renewal's CancelledError, so a cancellation of the
    # caller itself still reaches it rather than being swallowed here.
    await asyncio.wait([renewal])
