"""The ledger thread: one thread that makes the ledger calls of a worker's handler threads.

A threaded :class:`impl.Worker` with many handler threads on SQLite spends most of its
CPU handing the interpreter lock around, not in SQL: every ``sqlite3`` call releases it,
every handler thread has a connection of its own to open (with its own cold page cache
and statement cache), and the threads queue at the process's writer gate one write at a
time (bench/README.md, issue 15). With ``Worker(ledger_threads=1)`` the handler threads
make no ledger call themselves: each call (claim, renewal, an effect's durable steps,
advance, release, fail, and whatever a handler calls on ``ctx.store``) is handed to one
thread that runs it on its own connection, and the handler thread sleeps until the call
has returned (on PostgreSQL a few threads share the calls: see :class:`LedgerThread`).
An effect's ``fn`` (and an ``on_doubt`` probe) still runs in the handler thread, between
the durable steps, exactly as ``run_effect`` drives them (:mod:`model.effectstep`).

Nothing of the contract moves: each call is the store's own method, run to its end
(commit included) before the caller wakes, so an operation still returns only once what
it reports is durable; its exception (a fencing refusal, a failpoint's simulated crash)
is raised in the caller. With one thread, calls run one at a time in the order they
were handed over.

Failpoints (:data:`impl.failpoint.LEDGER_THREAD_POINTS`), on the ledger thread:
``ledger_thread.before_call`` before a call runs (a crash there leaves nothing of it)
and ``ledger_thread.after_call`` after it returned, its commit done, before its caller
is woken (a crash there leaves all of it, its caller never told).
"""

from __future__ import annotations

import _thread
import functools
import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar, cast

from impl import failpoint
from model.config import Config
from model.effectstep import EffectSteps, Probe, RunFn, SteppedStore
from model.errors import StorageError
from model.key import Scalar
from model.record import JSON, Lease, Plan
from model.store import EffectFn, OnDoubt, Store
from model.workflow import Workflow

T = TypeVar("T")

BEFORE_CALL, AFTER_CALL = failpoint.LEDGER_THREAD_POINTS

_Item = tuple[Callable[[], object], list[object], "_thread.LockType"] | None


class LedgerThread:
    """The thread(s) running the calls handed to them (see module doc).

    A call waits on a lock of its own, released by the thread once the call returned:
    one wake-up per call (a ``Future``'s condition costs two or three).

    Args:
        threads: how many threads make the calls: 1 for SQLite (one connection, calls
            one at a time in the order handed over); a few for PostgreSQL, whose store is
            thread-safe over a pool and whose calls wait on the server (with one thread
            they would wait one after another). Each calling thread is given one of them
            for good, so the durable steps of one effect, whose store may bind them to a
            connection of the thread that began them, all run on the same one.
    """

    def __init__(self, *, threads: int = 1) -> None:
        self._queues: list[queue.SimpleQueue[_Item]] = [queue.SimpleQueue() for _ in range(threads)]
        self._closed = False
        self._callers = threading.local()
        self._next = itertools.count()
        # Daemons: a worker whose caller never reaches close() must not keep the
        # process alive (the calls handed over run to their end all the same).
        self._threads = [
            threading.Thread(target=self._work, args=(q,), name="ledger", daemon=True)
            for q in self._queues
        ]
        for thread in self._threads:
            thread.start()
        self._idents = frozenset(t.ident for t in self._threads)

    def _work(self, calls: queue.SimpleQueue[_Item]) -> None:
        while (item := calls.get()) is not None:
            fn, box, done = item
            try:
                if failpoint.ARMED:
                    failpoint.hit(BEFORE_CALL)
                result = fn()
                if failpoint.ARMED:
                    failpoint.hit(AFTER_CALL)
            except BaseException as exc:  # a failpoint's crash travels to the caller too
                box.extend((exc, True))
            else:
                box.append(result)
            done.release()

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the thread; return its result or raise its exception.

        Raises:
            StorageError: the thread was closed.
        """
        if self._closed:
            raise StorageError("the worker's ledger thread is closed: the worker has stopped")
        if _thread.get_ident() in self._idents:
            return fn()  # a call made from inside a call (a telemetry listener's) runs here
        done = _thread.allocate_lock()
        done.acquire()
        box: list[object] = []
        calls: queue.SimpleQueue[_Item] | None = getattr(self._callers, "calls", None)
        if calls is None:
            calls = self._queues[next(self._next) % len(self._queues)]
            self._callers.calls = calls
        calls.put((fn, box, done))
        done.acquire()
        if len(box) == 2:
            raise cast(BaseException, box[0])
        return cast(T, box[0])

    def close(self) -> None:
        """Let the thread leave once the calls already handed over have run, and wait
        for it (at once when called on the thread itself)."""
        if not self._closed:
            self._closed = True
            for calls in self._queues:
                calls.put(None)
        if threading.get_ident() not in self._idents:
            for thread in self._threads:
                thread.join()


class ThreadedStore:
    """``store`` with every call made on ``thread`` (a :class:`Store`; see module doc).

    ``workflow``, ``config`` and ``now`` answer here, without a hand-over: they read the
    store's memory only (the registered workflows, its settings, its clock).
    """

    def __init__(self, store: Store, thread: LedgerThread) -> None:
        self._store = store
        self._thread = thread

    @property
    def inner(self) -> Store:
        """The store the calls are made on."""
        return self._store

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr
        thread = self._thread

        def on_thread(*args: object, **kwargs: object) -> object:
            return thread.call(lambda: attr(*args, **kwargs))

        return on_thread

    @property
    def config(self) -> Config:
        """The store's configuration."""
        return self._store.config

    def workflow(self, name: str) -> Workflow:
        """See ``Store.workflow``."""
        return self._store.workflow(name)

    def now(self) -> float:
        """See ``Store.now``."""
        return self._store.now()

    def wait_for_work(
        self, timeout: float, *, kinds: Sequence[str] | None = None, stop: Any = None
    ) -> bool:
        """See ``Store.wait_for_work``: waits here, in the caller (a wait on the thread
        would hold up every other call for its length)."""
        return self._store.wait_for_work(timeout, kinds=kinds, stop=stop)

    def lease_next(
        self, worker: str, *, ttl: float | None = None, kinds: Sequence[str] | None = None
    ) -> Lease | None:
        """See ``Store.lease_next``."""
        store = self._store
        return self._thread.call(lambda: store.lease_next(worker, ttl=ttl, kinds=kinds))

    def renew(self, lease: Lease, *, ttl: float | None = None) -> Lease:
        """See ``Store.renew``."""
        store = self._store
        return self._thread.call(lambda: store.renew(lease, ttl=ttl))

    def advance(self, lease: Lease, to_state: str) -> bool:
        """See ``Store.advance``."""
        store = self._store
        return self._thread.call(lambda: store.advance(lease, to_state))

    def release(self, lease: Lease, *, delay: float = 0.0, reason: str | None = None) -> None:
        """See ``Store.release``."""
        store = self._store
        self._thread.call(lambda: store.release(lease, delay=delay, reason=reason))

    def fail(
        self, lease: Lease, error: str, *, retryable: bool = True, delay: float | None = None
    ) -> None:
        """See ``Store.fail``."""
        store = self._store
        self._thread.call(lambda: store.fail(lease, error, retryable=retryable, delay=delay))

    def plan_many(self, kind: str, items: Iterable[Mapping[str, Scalar] | Plan]) -> list[str]:
        """See ``Store.plan_many`` (the items are read in the caller first)."""
        store = self._store
        listed = list(items)
        return self._thread.call(lambda: store.plan_many(kind, listed))

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
        """See ``Store.run_effect``: the durable steps on the thread, ``fn`` and the probe
        here (as :func:`model.effectstep.run_steps` drives them)."""
        stepped = cast(SteppedStore, self._store)
        held: list[EffectSteps] = []

        def first() -> RunFn | Probe | _Done:
            steps = stepped.effect_steps(lease, op, extras=extras, on_doubt=on_doubt, then=then)
            held.append(steps)
            return _advance(steps, None, None)

        try:
            step = self._thread.call(first)
            steps = held[0]
            while not isinstance(step, _Done):
                reply: object = None
                error: BaseException | None = None
                if isinstance(step, RunFn):
                    try:
                        reply = fn(step.context)
                    except Exception as exc:
                        error = exc  # the generator removes the start and re-raises it
                else:
                    assert callable(on_doubt)
                    reply = on_doubt(step.info)
                step = self._thread.call(functools.partial(_advance, steps, reply, error))
            return step.value
        finally:
            # Stopped at a yield (a crash, the probe raised): close the generator there,
            # running no durable step, so a recorded start stays.
            for steps in held:
                steps.close()


class _Done:
    """The step generator returned: ``value`` is the effect's result."""

    __slots__ = ("value",)

    def __init__(self, value: JSON) -> None:
        self.value = value


def _advance(
    steps: EffectSteps, reply: object, error: BaseException | None
) -> RunFn | Probe | _Done:
    """Run the generator's next durable step (on the ledger thread)."""
    try:
        return steps.throw(error) if error is not None else steps.send(reply)
    except StopIteration as stop:
        return _Done(stop.value)


def threaded(store: Store, thread: LedgerThread) -> Store:
    """``store`` with its calls made on ``thread``, typed as the :class:`Store` it is."""
    return cast(Store, ThreadedStore(store, thread))
