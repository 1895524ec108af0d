"""Writing transactions on psycopg's async connections, for ``impl.aio``'s native path.

The same transactions as :class:`impl.postgres.database.Database` (the hot path's bodies,
written once as steps, :mod:`impl.postgres.steps`), run on an
``psycopg_pool.AsyncConnectionPool`` by coroutines, so an event loop runs hundreds of them
at once without a thread each. Everything :mod:`impl.postgres.database` says holds here:
the one clock rule (:meth:`AsyncTx.now`), pipeline mode (``BEGIN`` travels with the first
statement, ``COMMIT`` with the final Sync), the failpoints ``{op}.before_tx``,
``{op}.before_commit`` and ``{op}.after_commit``, history reported to telemetry only after
the commit, the bounded re-runs of a transaction the server asks to re-run, and the same
error translation (:func:`impl.postgres.database.translate`).

The schema is migrated and the workflows registered by the sync store that opens first
(``impl.aio`` opens it on a thread); this pool only runs transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Mapping
from typing import TypeVar

import psycopg
from attrs import define, field
from psycopg.rows import DictRow, TupleRow, dict_row
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from impl import failpoint, telemetry
from impl.postgres import queries as q
from impl.postgres import steps
from impl.postgres.channel import channel_of, payload_after
from impl.postgres.database import (
    CONNECT_TIMEOUT,
    POOL_MIN_SIZE,
    RETRY_PAUSE,
    TX_ATTEMPTS,
    describe,
    lost,
    pool_failure,
    retryable,
    translate,
)
from impl.postgres.schema import search_path
from impl.postgres.steps import Op, Steps, Transaction
from model.clock import Clock
from model.config import Config
from model.errors import StorageError
from model.record import HistoryEvent

T = TypeVar("T")

ASYNC_POOL_MAX_SIZE = 16
"""Connections of the async pool. A connection is busy only while a transaction's
statements travel (no thread waits beside it), so a few serve hundreds of tasks; more
than the sync pool's 8 because the loop keeps them all busy at once."""


@define
class AsyncTx:
    """One open transaction on an async connection (see ``database.Tx``)."""

    cur: psycopg.AsyncCursor[DictRow]
    clock: float | None
    pipeline: psycopg.AsyncPipeline | None = None
    events: list[HistoryEvent] = field(factory=list)
    channel: str | None = None
    _server_now: float | None = field(default=None, init=False)
    _announced: set[str] = field(factory=set, init=False)

    def _bind(self, params: Mapping[str, object] | None) -> Mapping[str, object] | None:
        return None if params is None else {**params, "clock": self.clock}

    async def now(self) -> float:
        """This transaction's ``now`` (asks the server once, only if Python needs it)."""
        if self.clock is not None:
            return self.clock
        if self._server_now is None:
            await self.cur.execute(q.SERVER_NOW)
            row = await self.cur.fetchone()
            assert row is not None
            self._server_now = float(next(iter(row.values())))
        return self._server_now

    async def drive(self, body: Steps[T]) -> T:
        """Run a body written as steps in this transaction (see ``Tx.drive``)."""
        try:
            op = next(body)
            while True:
                try:
                    reply = await self.execute(op)
                except BaseException as exc:
                    op = body.throw(exc)
                else:
                    op = body.send(reply)
        except StopIteration as stop:
            done: T = stop.value
            return done

    async def execute(self, op: Op) -> object:
        """Answer one step's request."""
        if isinstance(op, steps.One):
            await self.cur.execute(op.query, self._bind(op.params))
            return await self.cur.fetchone()
        if isinstance(op, steps.All):
            await self.cur.execute(op.query, self._bind(op.params))
            return await self.cur.fetchall()
        if isinstance(op, steps.Run):
            await self.cur.execute(op.query, self._bind(op.params))
            if self.pipeline is not None:
                await self.pipeline.sync()  # as Tx.run: learn the count now
            return self.cur.rowcount
        if isinstance(op, steps.Now):
            return await self.now()
        if isinstance(op, steps.Logged):
            self.events.append(op.event)
            return None
        payload = (
            None
            if self.channel is None
            else payload_after(self._announced, op.kind, later=op.later)
        )
        if self.channel is not None and payload is not None:
            self._announced.add(payload)
            await self.cur.connection.cursor().execute(
                q.NOTIFY, {"channel": self.channel, "payload": payload}
            )
        return None


async def _roll_back(conn: psycopg.AsyncConnection[TupleRow]) -> None:
    """End a failed pipelined transaction; a dead connection is left to the pool."""
    with contextlib.suppress(psycopg.Error):
        if conn.pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            await conn.rollback()


def _began(control: psycopg.AsyncCursor[TupleRow]) -> bool:
    result = control.pgresult
    return result is not None and result.status == psycopg.pq.ExecStatus.COMMAND_OK


class AsyncDatabase:
    """An async pool of connections to one (already migrated) ledger schema.

    Args:
        url: a ``postgresql://`` connection URL.
        schema: the ledger's PostgreSQL schema.
        clock: an injected clock, or None for the server's clock.
        config: tunables (``busy_timeout`` becomes the server's ``lock_timeout``).
    """

    def __init__(self, url: str, *, schema: str, clock: Clock | None, config: Config) -> None:
        self.schema = schema
        self.url = url
        self.channel = channel_of(schema)
        self.where = f"{describe(url)} schema {schema!r}"
        self._clock = clock
        self._lock_timeout = f"{max(1, round(config.busy_timeout * 1000))}ms"
        self._closed = False
        self._turns = asyncio.Semaphore(ASYNC_POOL_MAX_SIZE)
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]] = AsyncConnectionPool(
            url,
            min_size=POOL_MIN_SIZE,
            max_size=ASYNC_POOL_MAX_SIZE,
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT},
            configure=self._configure,
            timeout=max(config.busy_timeout, 1.0),
            name=f"jobledger-aio:{schema}",
            open=False,
        )

    async def _configure(self, conn: psycopg.AsyncConnection[TupleRow]) -> None:
        await conn.execute(search_path(self.schema, local=False))
        await conn.execute(q.SET_LOCK_TIMEOUT, {"timeout": self._lock_timeout})
        await conn.execute(q.SET_NO_JIT)  # as the sync sessions: see Database._configure

    async def open(self) -> None:
        """Open the pool (its first connection made before this returns).

        Raises:
            StorageError: no connection within ``CONNECT_TIMEOUT`` seconds.
        """
        try:
            await self._pool.open(wait=True, timeout=CONNECT_TIMEOUT)
        except PoolTimeout as exc:
            await self._pool.close()
            raise StorageError(
                f"open the ledger at {self.where}: no connection within {CONNECT_TIMEOUT} s; "
                "check that the server is up and accepts connections"
            ) from exc

    async def close(self) -> None:
        """Close every pooled connection; later calls raise ``StorageError``."""
        self._closed = True
        await self._pool.close()

    def drop(self) -> None:
        """Forget a pool whose loop has closed (it cannot be closed from another loop);
        later calls raise ``StorageError``."""
        self._closed = True

    def _clock_reading(self) -> float | None:
        return None if self._clock is None else float(self._clock())

    async def transact(self, transaction: Transaction[T]) -> T:
        """Run a writing transaction written as steps, with its op's failpoints."""
        op = transaction.op
        failpoint.hit(f"{op}.before_tx")
        # Callers queue here, without a time limit, as the thread path's calls queue for
        # its threads: at most one transaction per connection asks the pool, so the
        # pool's timeout (the busy timeout) measures a connection that cannot be had,
        # not a queue of hundreds of tasks (29 DatabaseLocked in one 256-task benchmark
        # run without it).
        async with self._turns:
            out = await self._run(op, transaction.body, commit_point=f"{op}.before_commit")
        failpoint.hit(f"{op}.after_commit")
        return out

    async def _run(self, what: str, body: Callable[[], Steps[T]], *, commit_point: str) -> T:
        if self._closed:
            raise StorageError("this store is closed; open a new one with impl.aio.open_store")
        attempt = 0
        while True:
            attempt += 1
            stage = "begin"
            control: psycopg.AsyncCursor[TupleRow] | None = None
            try:
                async with self._pool.connection() as conn:
                    control = conn.cursor()
                    try:
                        async with conn.pipeline() as pipe:
                            await control.execute(q.BEGIN)
                            tx = AsyncTx(
                                conn.cursor(row_factory=dict_row),
                                self._clock_reading(),
                                pipe,
                                channel=self.channel,
                            )
                            out = await tx.drive(body())
                            stage = "body"
                            failpoint.hit(commit_point)
                            stage = "commit"
                            await control.execute(q.COMMIT)
                        # Leaving the pipeline sent the Sync: COMMIT's answer is in.
                    except BaseException:
                        await _roll_back(conn)
                        raise
                # Committed: only now may the world hear of what it recorded.
                for event in tx.events:
                    telemetry.emit_history(event)
                return out
            except (PoolTimeout, PoolClosed) as exc:
                raise pool_failure(exc, what, self.where, "impl.aio.open_store") from exc
            except psycopg.Error as exc:
                if stage == "begin" and control is not None and _began(control):
                    stage = "body"  # BEGIN was answered: the loss came inside the body
                if attempt < TX_ATTEMPTS and retryable(exc, stage):
                    if lost(exc):
                        await self._pool.check()
                    await asyncio.sleep(RETRY_PAUSE * attempt * (1 + random.random()))
                    continue
                raise translate(exc, what, stage=stage) from exc
