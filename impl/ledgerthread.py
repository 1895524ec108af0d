"""The ledger thread: one thread that makes the ledger calls of a worker's handler threads.

A threaded :class:`impl.Worker` with many handler threads on SQLite spends most of its
CPU handing the interpreter lock around, not in SQL: every ``sqlite3`` call releases it,
every handler thread has a connection of its own to open (with its own cold page cache
and statement cache), and the threads queue at the process's writer gate one write at a
time (bench/README.md, issue 15). With ``Worker(ledger_thread=True)`` the handler threads
make no ledger call themselves: each call (claim, renewal, an effect's durable steps,
advance, release, fail, and whatever a handler calls on ``ctx.store``) is handed to one
thread that runs it on its own connection, and the handler thread sleeps until the call
has returned. An effect's ``fn`` (and an ``on_doubt`` probe) still runs in the handler
thread, between the durable steps, exactly as ``run_effect`` drives them
(:mod:`model.effectstep`).

Nothing of the contract moves: each call is the store's own method, run to its end
(commit included) before the caller wakes, so an operation still returns only once what
it reports is durable; its exception (a fencing refusal, a failpoint's simulated crash)
is raised in the caller. Calls run one at a time in the order they were handed over.

Failpoints (:data:`impl.failpoint.LEDGER_THREAD_POINTS`), on the ledger thread:
``ledger_thread.before_call`` before a call runs (a crash there leaves nothing of it)
and ``ledger_thread.after_call`` after it returned, its commit done, before its caller
is woken (a crash there leaves all of it, its caller never told).
"""

from __future__ import annotations

import _thread
import functools
import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar, cast

from impl import failpoint
from model.effectstep import EffectSteps, Probe, RunFn, SteppedStore
from model.errors import StorageError
from model.key import Scalar
from model.record import JSON, Lease
from model.store import EffectFn, OnDoubt, Store

T = TypeVar("T")

BEFORE_CALL, AFTER_CALL = failpoint.LEDGER_THREAD_POINTS

_Item = tuple[Callable[[], object], list[object], "_thread.LockType"] | None


class LedgerThread:
    """One thread running the calls handed to it, one at a time (see module doc).

    A call waits on a lock of its own, released by the thread once the call returned:
    one wake-up per call (a ``Future``'s condition costs two or three).
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._closed = False
        # A daemon: a worker whose caller never reaches close() must not keep the
        # process alive (the calls handed over run to their end all the same).
        thread = threading.Thread(target=self._work, name="ledger", daemon=True)
        thread.start()
        self._thread = thread
        self._ident = thread.ident

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
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
        if _thread.get_ident() == self._ident:
            return fn()  # a call made from inside a call (a telemetry listener's) runs here
        done = _thread.allocate_lock()
        done.acquire()
        box: list[object] = []
        self._queue.put((fn, box, done))
        done.acquire()
        if len(box) == 2:
            raise cast(BaseException, box[0])
        return cast(T, box[0])

    def close(self) -> None:
        """Let the thread leave once the calls already handed over have run, and wait
        for it (at once when called on the thread itself)."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        if threading.get_ident() != self._ident:
            self._thread.join()


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
    def config(self) -> Any:
        """The store's configuration."""
        return self._store.config

    def workflow(self, name: str) -> Any:
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

    def plan_many(self, kind: str, items: Iterable[Mapping[str, Scalar]]) -> list[str]:
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
    ) -> JSON:
        """See ``Store.run_effect``: the durable steps on the thread, ``fn`` and the probe
        here (as :func:`model.effectstep.run_steps` drives them)."""
        stepped = cast(SteppedStore, self._store)
        held: list[EffectSteps] = []

        def first() -> RunFn | Probe | _Done:
            steps = stepped.effect_steps(lease, op, extras=extras, on_doubt=on_doubt)
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
