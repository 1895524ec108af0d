"""The native PostgreSQL path of :class:`impl.aio.AsyncStore`: the hot path on psycopg's
``AsyncConnection`` and ``AsyncConnectionPool``, with no thread per call.

``plan``, ``plan_many``, ``lease_next``, ``renew``, ``release``, ``advance``, ``fail`` and
``run_effect`` run here: the sync store builds each transaction as steps
(``PostgresStore.*_tx``, ``PostgresStore.effect_flow``: the same SQL and decisions it
runs itself) and :class:`impl.postgres.asyncdb.AsyncDatabase` answers them with awaited
statements. Everything else (opening and migrating, ``register``, reads, ``reconcile``,
``prune``, operator actions, ``wait_for_work``) stays on the store's threads
(specs/012-async.md says which and why).

**Cancellation** is the thread path's: a transaction runs as a task of its own and a
cancelled caller waits for it to end, then raises ``CancelledError``, so it committed
whole or not at all (impl.aio.thread).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

from impl.aio.thread import outlast
from impl.aio.userfn import awaited_result
from impl.postgres.asyncdb import AsyncDatabase
from impl.postgres.steps import Transaction
from impl.postgres.store import PostgresStore
from model.effectstep import RunFn
from model.key import Scalar
from model.record import JSON, DoubtInfo, EffectContext, Lease
from model.store import OnDoubt

T = TypeVar("T")


class NativePostgres:
    """The hot path of one async store over ``store``'s ledger, on an async pool.

    Args:
        store: the open sync store (it migrated the schema and knows the workflows).
    """

    loop: asyncio.AbstractEventLoop
    """The loop the pool was opened on: its connections belong to it."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.db = AsyncDatabase(
            store.url,
            schema=store.config.postgres_schema,
            clock=store.clock,
            config=store.config,
        )

    async def open(self) -> None:
        """Open the async pool, bound to the running loop (:attr:`loop`)."""
        self.loop = asyncio.get_running_loop()
        await self.db.open()

    async def close(self) -> None:
        """Close the async pool. From another loop than its own: if that loop still runs
        (in another thread), the pool is closed there; if not (an ``asyncio.run`` that
        ended, which also ended the pool's tasks), it is dropped and its connections
        close as they are freed."""
        here = asyncio.get_running_loop()
        if self.loop is here:
            await self.db.close()
        elif self.loop.is_running():
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.db.close(), self.loop))
        else:
            self.db.drop()

    async def transact(self, transaction: Transaction[T]) -> T:
        """Run ``transaction`` natively; a cancelled caller waits for it (module doc)."""
        return await whole(self.db.transact(transaction))

    async def run_effect(
        self,
        lease: Lease,
        op: str,
        fn: Callable[[EffectContext], Awaitable[JSON]],
        *,
        extras: Mapping[str, Scalar] | None,
        on_doubt: OnDoubt,
        probe: Callable[[DoubtInfo], Awaitable[JSON] | JSON] | None,
        then: str | None = None,
    ) -> JSON:
        """``run_effect`` driven here: the flow's transactions awaited natively, ``fn``
        and the probe awaited on the loop between them (``AsyncStore.run_effect``);
        ``then`` is taken in the transaction that records or replays the result."""
        flow = self.store.effect_flow(lease, op, extras=extras, on_doubt=on_doubt, then=then)
        reply: object = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    step = flow.throw(error) if error is not None else flow.send(reply)
                except StopIteration as stop:
                    done: JSON = stop.value
                    return done
                reply, error = None, None
                if isinstance(step, Transaction):
                    try:
                        reply = await self.transact(step)
                    except Exception as exc:  # raised in the flow, where it was asked
                        error = exc
                elif isinstance(step, RunFn):
                    try:
                        reply = await awaited_result(fn(step.context), "fn")
                    except Exception as exc:  # the flow removes the start, re-raises
                        error = exc
                else:
                    assert probe is not None
                    probed = probe(step.info)
                    reply = await probed if inspect.isawaitable(probed) else probed
        finally:
            # Stopped at a yield (cancelled, a crash, the probe raised): close the flow
            # there, running no durable step, so a recorded start stays.
            flow.close()


async def whole(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` as a task of its own that a cancellation of the caller does not
    cut short: the caller waits for it, then raises ``CancelledError``."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await outlast(task)
        raise
