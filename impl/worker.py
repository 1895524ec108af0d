"""The worker runtime: lease a job, run its handler, keep the lease alive, end cleanly.

Most users run a :class:`Worker` instead of calling the primitives by hand. A worker
leases jobs of the kinds it has handlers for, calls ``handler(ctx)`` with a
:class:`JobContext`, renews the lease in a background thread while the handler runs, and
turns an exception into ``fail`` with backoff. SIGTERM and SIGINT stop it after the
current effect, releasing the lease so the job costs no attempt.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from types import FrameType

from attrs import define, evolve, field

from impl import telemetry
from impl.ledgerthread import LedgerThread, threaded
from impl.outcome import RetryLater
from model.errors import InvalidInput, JobledgerError, LeaseLost, StorageError
from model.key import Scalar
from model.record import JSON, Lease
from model.store import EffectFn, OnDoubt, Store
from model.validate import storable_text
from model.workflow import reached

log = logging.getLogger("jobledger.worker")

IDLE_POLL_DEFAULT = 0.5
IDLE_SLEEPER_WAIT = 1.0
"""Seconds an idle thread of a worker run ``until_idle`` sleeps at most while another
idle thread has the turn to look for work (see ``Worker._idle_turn``)."""
NO_PROGRESS_ERROR = (
    "the handler returned without advancing the job or reaching a terminal state; "
    "a handler must make progress (ctx.advance) or raise"
)


class StopRequested(BaseException):
    """Raised inside a handler when the worker was asked to stop.

    A ``BaseException`` so that a handler's ``except Exception`` cannot swallow it; the
    worker catches it and releases the lease.
    """


class LeaseView:
    """The job's data as a handler's context shows it, read from the context's lease
    (shared by the threaded :class:`JobContext` and ``impl.aio.AsyncJobContext``)."""

    __slots__ = ()
    lease: Lease

    @property
    def identity(self) -> Mapping[str, Scalar]:
        """The job's identity."""
        return self.lease.identity

    @property
    def payload(self) -> JSON:
        """The job's payload."""
        return self.lease.payload

    @property
    def state(self) -> str:
        """The job's current state as this context knows it."""
        return self.lease.state

    @property
    def job_id(self) -> str:
        """The job's id."""
        return self.lease.job_id


@define
class JobContext(LeaseView):
    """What a handler receives: the lease, the job's data, and fenced actions.

    ``advance`` and ``effect`` raise :class:`LeaseLost` at once if the background renewal
    found the lease lost, and :class:`StopRequested` if the worker is stopping.
    """

    store: Store
    lease: Lease
    _lost: threading.Event = field(alias="lost")
    _stopping: threading.Event = field(alias="stopping")
    _lock: threading.Lock = field(factory=threading.Lock, alias="lock")
    advanced: bool = False

    def _guard(self, op: str) -> Lease:
        if self._stopping.is_set():
            raise StopRequested
        with self._lock:
            lease = self.lease
        if self._lost.is_set():
            raise LeaseLost(
                lease.job_id, lease.token, None, "the background renewal lost the lease", op
            )
        return lease

    def _set_lease(self, lease: Lease) -> None:
        with self._lock:
            self.lease = lease

    def advance(self, state: str) -> bool:
        """Advance the job along one declared edge (see ``Store.advance``)."""
        lease = self._guard("advance")
        moved = self.store.advance(lease, state)
        if moved:
            self.advanced = True
            with self._lock:
                self.lease = evolve(self.lease, state=state)
        return moved

    def effect(
        self,
        op: str,
        fn: EffectFn,
        *,
        extras: Mapping[str, Scalar] | None = None,
        on_doubt: OnDoubt = "retry",
        then: str | None = None,
    ) -> JSON:
        """Run an effect once per op key (see ``Store.run_effect``); with ``then``, the
        job advances to that state in the transaction that records the result."""
        lease = self._guard("run_effect")
        started = time.perf_counter()
        try:
            result = self.store.run_effect(
                lease, op, fn, extras=extras, on_doubt=on_doubt, then=then
            )
        finally:
            telemetry.emit(
                "worker.effect", kind=lease.kind, op=op, seconds=time.perf_counter() - started
            )
        if then is not None and not reached(self.store.workflow(lease.kind), lease.state, then):
            self.advanced = True
            with self._lock:
                self.lease = evolve(self.lease, state=then)
        return result

    def renew(self, *, ttl: float | None = None) -> Lease:
        """Renew the lease now (long effects may call this between chunks)."""
        lease = self._guard("renew")
        renewed = self.store.renew(lease, ttl=ttl)
        self._set_lease(renewed)
        return renewed

    def is_terminal(self) -> bool:
        """True when the job's workflow says its current state ends it."""
        return self.store.workflow(self.lease.kind).is_terminal(self.state)


Handler = Callable[[JobContext], object]
"""A job handler: drives one job forward through ``ctx``."""


class _Renewer:
    """One background thread that renews whichever lease its worker loop is running.

    A worker loop keeps one renewer for all its jobs: starting and joining a thread per
    job cost about half a millisecond, a third of a no-op job's whole life. Watching a
    new job does not wake the thread either (on two cores each wake-up cost the worker
    tens of microseconds of GIL hand-offs per job): the thread sleeps until the watched
    job's next renewal is due, and a job watched later is never due earlier. It is woken
    only when it sleeps with nothing to watch. ``unwatch`` returns only once no renewal
    of the old job is in flight, as a join would.
    """

    def __init__(self, interval: float, ttl: float | None) -> None:
        self.interval = interval
        self.ttl = ttl
        self._cond = threading.Condition()
        self._ctx: JobContext | None = None
        self._due = 0.0
        self._idle = False
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None

    def watch(self, ctx: JobContext) -> None:
        """Start renewing ``ctx``'s lease every ``interval`` seconds."""
        with self._cond:
            self._ctx = ctx
            self._due = time.monotonic() + self.interval
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="renew", daemon=True)
                self._thread.start()
            elif self._idle:
                self._cond.notify_all()

    def unwatch(self) -> None:
        """Stop renewing; wait for a renewal in flight to finish."""
        with self._cond:
            self._ctx = None
            while self._busy:
                self._cond.wait()

    def close(self) -> None:
        """Stop the thread."""
        with self._cond:
            self._ctx = None
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        with self._cond:
            while not self._closed:
                ctx = self._ctx
                if ctx is None:
                    self._idle = True
                    self._cond.wait()
                    self._idle = False
                    continue
                wait = self._due - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue  # the job may have ended, or another begun, meanwhile
                self._busy = True
                self._due = time.monotonic() + self.interval
                self._cond.release()
                try:
                    self._renew(ctx)
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._cond.notify_all()

    def _renew(self, ctx: JobContext) -> None:
        try:
            ctx._set_lease(ctx.store.renew(ctx.lease, ttl=self.ttl))
            telemetry.emit("worker.renewed", kind=ctx.lease.kind)
        except LeaseLost as exc:
            log.warning("lease lost while the handler ran: %s", exc)
            ctx._lost.set()
            with self._cond:
                if self._ctx is ctx:
                    self._ctx = None
        except StorageError as exc:
            # A busy or briefly unreachable database: try again next interval; the
            # lease survives as long as one renewal lands before it expires.
            log.warning("lease renewal failed, will retry: %s", exc)
            telemetry.emit("worker.renewal_failed", kind=ctx.lease.kind)


@define
class RunReport:
    """What a worker did in one ``run``."""

    jobs: int = 0
    finished: int = 0
    released: int = 0
    failed: int = 0
    lost: int = 0


def default_worker_name(index: int = 0) -> str:
    """``host:pid:index``: unique per process, and tells an operator where it ran."""
    return f"{socket.gethostname()}:{os.getpid()}:{index}"


class Worker:
    """Runs handlers for leased jobs until stopped or, with ``until_idle``, idle.

    Args:
        store: the store to lease from (its connections are per thread).
        handlers: kind -> handler(ctx).
        name: worker name for leases; default ``host:pid:n``.
        ttl: lease TTL in seconds; default the store's configured TTL.
        concurrency: handler threads in this process, each leasing its own jobs.
        renew_every: seconds between background renewals; default a third of the TTL.
        idle_poll: the longest wait, in seconds, when no job is eligible: the store wakes
            an idle worker as soon as one is (``Store.wait_for_work``), and the worker
            looks anyway once this has passed.
        on_error: called (in the handler thread) with a store error met outside a
            handler, such as taking a lease from a full ledger. The worker logs it and
            tries again after ``idle_poll``, unless the callback stopped the worker
            (``jobledger download`` does, for a fault of the world).
        ledger_threads: n >= 1: the handler threads hand every ledger call to n threads
            of the worker's own (:mod:`impl.ledgerthread`); handlers and effects still
            run in the handler threads. 0: each handler thread makes its own calls.
            None (the default): the store's ``worker_ledger_threads`` when
            ``concurrency`` > 1 (1 on SQLite unless its commits are grouped by
            ``sqlite_group_window``, where it saves about half the CPU a
            worker with dozens of threads spends per job: handing the interpreter lock
            around, one connection per thread), else 0 (PostgreSQL, whose calls on one
            thread would wait on the server one after another, and any worker with one
            handler thread, where the hand-off costs more than it saves).
    """

    def __init__(
        self,
        store: Store,
        handlers: Mapping[str, Handler],
        *,
        name: str | None = None,
        ttl: float | None = None,
        concurrency: int = 1,
        renew_every: float | None = None,
        idle_poll: float = IDLE_POLL_DEFAULT,
        on_error: Callable[[JobledgerError], None] | None = None,
        ledger_threads: int | None = None,
    ) -> None:
        if not handlers:
            raise InvalidInput("Worker needs at least one handler: handlers={'kind': fn}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise InvalidInput(f"concurrency must be an int >= 1, got {concurrency!r}")
        for kind in handlers:
            store.workflow(kind)  # UnknownWorkflow now rather than on the first lease.
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
            # The store's TTL, not a default: renewing less often than it expires loses it.
            self.renew_every = store.config.renew_interval
        self.idle_poll = idle_poll
        self.on_error = on_error
        if ledger_threads is None:
            wanted = getattr(store, "worker_ledger_threads", 0)
            ledger_threads = wanted if self.concurrency > 1 and isinstance(wanted, int) else 0
        if (
            isinstance(ledger_threads, bool)
            or not isinstance(ledger_threads, int)
            or ledger_threads < 0
        ):
            raise InvalidInput(
                f"ledger_threads must be None or an int >= 0, got {ledger_threads!r}"
            )
        self.ledger_threads = ledger_threads
        # What the handler threads call: the store, or the store on the ledger thread
        # (set for the length of a run).
        self._calls: Store = store
        self._stopping = threading.Event()
        # The idle thread whose turn it is to look for work (run until_idle), or None.
        self._looker: int | None = None
        # Run without until_idle: whether an idle thread is waiting on the store for
        # work, while the other idle threads sleep on the condition (see _wait_for_work).
        self._waiting = False
        self._wait_cond = threading.Condition()
        self._report = RunReport()
        self._report_lock = threading.Lock()

    def stop(self) -> None:
        """Ask the worker to stop after the current effect of each running job."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called or a stop signal arrived."""
        return self._stopping.is_set()

    def _count(self, **fields: int) -> None:
        with self._report_lock:
            for key, value in fields.items():
                setattr(self._report, key, getattr(self._report, key) + value)
        # The same counts, for metrics (impl.metrics.worker): RunReport's field names.
        telemetry.emit("worker.counted", **fields)

    def run_once(self, *, name: str | None = None) -> bool:
        """Lease and run one job. Return False when nothing was eligible."""
        renewer = _Renewer(self.renew_every, self.ttl)
        try:
            return self._run_one(name if name is not None else self.name, renewer)
        finally:
            renewer.close()

    def _run_one(self, worker: str, renewer: _Renewer) -> bool:
        if self._stopping.is_set():
            return False
        lease = self._calls.lease_next(worker, ttl=self.ttl, kinds=self._kinds)
        if lease is None:
            return False
        self._count(jobs=1)
        ctx = JobContext(self._calls, lease, lost=threading.Event(), stopping=self._stopping)
        renewer.watch(ctx)
        try:
            self._handle(ctx)
        except StopRequested:
            renewer.unwatch()
            self._end(ctx, release=True)
            return True
        except LeaseLost as exc:
            renewer.unwatch()
            log.warning("job %s: %s", lease.job_id, exc)
            self._count(lost=1)
            return True
        except RetryLater as exc:
            renewer.unwatch()
            self._retry_later(ctx, exc)
            return True
        except Exception as exc:
            renewer.unwatch()
            # An exception may say it is permanent (a 404 will not heal with a retry).
            retryable = bool(getattr(exc, "retryable", True))
            # An exception's text may hold what no store accepts (a NUL, the lone
            # surrogates of an undecodable file name): escaped, the failure is recorded.
            self._fail(ctx, storable_text(f"{type(exc).__name__}: {exc}"), retryable=retryable)
            return True
        renewer.unwatch()
        if ctx.is_terminal():
            self._count(finished=1)
        elif ctx.advanced:
            self._end(ctx, release=True)
        else:
            self._fail(ctx, NO_PROGRESS_ERROR)
        return True

    def _handle(self, ctx: JobContext) -> None:
        """Call the job's handler, timed for metrics however it ends."""
        started = time.perf_counter()
        try:
            self.handlers[ctx.lease.kind](ctx)
        finally:
            telemetry.emit(
                "worker.handled", kind=ctx.lease.kind, seconds=time.perf_counter() - started
            )

    def _end(self, ctx: JobContext, *, release: bool) -> None:
        if not release:
            return
        try:
            self._calls.release(ctx.lease)
            self._count(released=1)
        except LeaseLost as exc:
            log.warning("job %s: release after the lease was lost: %s", ctx.job_id, exc)
            self._count(lost=1)

    def _retry_later(self, ctx: JobContext, exc: RetryLater) -> None:
        # The world is wrong, not the job: hand it back (the attempt too) with the reason
        # in its history. Without a delay, the backoff of a first failure: soon, not now.
        delay = exc.delay if exc.delay is not None else self.store.config.backoff(1)
        # INFO, not WARNING: handing a job back is the expected answer to a known fault,
        # and the caller (e.g. ``jobledger download``) reports the fault once.
        log.info("job %s: retry later in %.1f s: %s", ctx.job_id, delay, exc.reason)
        try:
            self._calls.release(ctx.lease, delay=delay, reason=storable_text(str(exc.reason)))
            self._count(released=1)
        except LeaseLost as lost:
            log.warning("job %s: release after the lease was lost: %s", ctx.job_id, lost)
            self._count(lost=1)

    def _fail(self, ctx: JobContext, error: str, *, retryable: bool = True) -> None:
        try:
            self._calls.fail(ctx.lease, error, retryable=retryable)
            self._count(failed=1)
            if telemetry.listeners():
                self._report_failure(ctx)
        except LeaseLost as exc:
            log.warning("job %s failed after its lease was lost: %s", ctx.job_id, exc)
            self._count(lost=1)

    def _report_failure(self, ctx: JobContext) -> None:
        """Tell metrics whether the failed job will run again (one read, only when
        someone listens): ``fail`` retries while attempts are left."""
        try:
            failed_state = self.store.workflow(ctx.lease.kind).failed
            again = self._calls.state(ctx.job_id) != failed_state
        except JobledgerError as exc:
            log.warning("job %s: cannot read its state after a failure: %s", ctx.job_id, exc)
            return
        telemetry.emit("worker.failed", kind=ctx.lease.kind, retry=again)

    def _loop(
        self, index: int, until_idle: bool, idle: list[bool], cond: threading.Condition
    ) -> None:
        name = self.name if self.concurrency == 1 else f"{self.name}/{index}"
        renewer = _Renewer(self.renew_every, self.ttl)
        try:
            self._serve(
                name, index=index, until_idle=until_idle, idle=idle, cond=cond, renewer=renewer
            )
        finally:
            renewer.close()

    def _serve(
        self,
        name: str,
        *,
        index: int,
        until_idle: bool,
        idle: list[bool],
        cond: threading.Condition,
        renewer: _Renewer,
    ) -> None:
        while not self._stopping.is_set():
            try:
                did = self._run_one(name, renewer)
            except JobledgerError as exc:
                if self.on_error is not None:
                    self.on_error(exc)
                if self._stopping.is_set():
                    break  # the callback stopped the worker: it has dealt with the error
                log.error("worker %s: %s", name, exc)
                did = False
                if not until_idle:
                    self._stopping.wait(self.idle_poll)
                    continue
            with cond:
                was_idle = idle[index]
                idle[index] = not did
                if until_idle and all(idle):
                    cond.notify_all()
                    return
                if did and was_idle:
                    # The idle thread that looks found work: there may be more, and the
                    # others wait for this word (see _idle_turn).
                    cond.notify_all()
            if not did:
                if until_idle:
                    if not self._idle_turn(index, idle, cond):
                        return
                else:
                    self._wait_for_work()
        with cond:
            cond.notify_all()  # stopping: sleepers in _idle_turn need not wait for the net

    def _idle_turn(self, index: int, idle: list[bool], cond: threading.Condition) -> bool:
        """Wait, with ``until_idle``, before an idle thread looks for work again; False
        once every thread is idle.

        Another thread may still be working, and its job can make more eligible (or
        end, leaving the worker idle). One idle thread at a time looks again every
        ``idle_poll`` (the looker); the others sleep until it finds work, until every
        thread is idle or the worker stops (or, as a safety net, for
        :data:`IDLE_SLEEPER_WAIT`: then one of them may take the turn). Without it, 63 idle
        threads of a 64-thread worker each took the write lock every ``idle_poll`` to
        find nothing, and the last jobs' own transactions queued behind them: draining
        the last round took 50 times its 20 ms handlers (issue 15, bench/README.md).
        """
        with cond:
            if all(idle):
                return False
            if self._looker is None:
                self._looker = index
                try:
                    cond.wait(self.idle_poll)
                finally:
                    # The looker takes the turn again if it finds nothing: waking a sleeper
                    # to look too would only double the empty looks.
                    self._looker = None
            else:
                # The longer wait is only a safety net: the looker wakes the sleepers.
                cond.wait(max(self.idle_poll, IDLE_SLEEPER_WAIT))
            return not all(idle)

    def _wait_for_work(self) -> None:
        """Sleep until the store says a job of our kinds is eligible (it hears of new
        work at once, see ``Store.wait_for_work``), at most ``idle_poll`` seconds: the
        poll after it is the safety net for a sign the store missed.

        One idle thread of the worker waits on the store; the others sleep until it
        returns (work, its timeout, or a stop: it watches the stop event), then all
        look. Before, each idle thread waited on the store: every commit of the busy
        ones woke all of them, and each read the queue to find nothing (at the end of
        a 64-thread download, thousands of reads and wake-ups, see bench/README.md).
        """
        with self._wait_cond:
            if self._waiting:
                if not self._stopping.is_set():
                    self._wait_cond.wait(self.idle_poll)
                return
            self._waiting = True
        try:
            self.store.wait_for_work(self.idle_poll, kinds=self._kinds, stop=self._stopping)
        except JobledgerError as exc:
            log.warning("worker %s: waiting for work failed, polling instead: %s", self.name, exc)
            self._stopping.wait(self.idle_poll)
        finally:
            with self._wait_cond:
                self._waiting = False
                self._wait_cond.notify_all()

    def run(self, *, until_idle: bool = False) -> RunReport:
        """Run until stopped (SIGTERM/SIGINT or :meth:`stop`), or until idle.

        Signal handlers are installed only when called from the main thread; the
        previous handlers are restored on return.
        """
        previous: dict[signal.Signals, object] = {}
        if threading.current_thread() is threading.main_thread():

            def on_signal(signum: int, _frame: FrameType | None) -> None:
                log.warning("signal %d: stopping after the current effect", signum)
                self._stopping.set()

            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, on_signal)
        idle = [False] * self.concurrency
        cond = threading.Condition()
        started = time.monotonic()
        ledger = LedgerThread(threads=self.ledger_threads) if self.ledger_threads else None
        if ledger is not None:
            self._calls = threaded(self.store, ledger)
        try:
            if self.concurrency == 1:
                self._loop(0, until_idle, idle, cond)
            else:
                threads = [
                    threading.Thread(
                        target=self._loop, args=(i, until_idle, idle, cond), name=f"worker-{i}"
                    )
                    for i in range(self.concurrency)
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    # A bounded join keeps the main thread responsive to signals.
                    while t.is_alive():
                        t.join(0.2)
        finally:
            if ledger is not None:
                self._calls = self.store
                ledger.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)  # type: ignore[arg-type]
        log.info("worker %s ran %.1f s: %s", self.name, time.monotonic() - started, self._report)
        return self._report
