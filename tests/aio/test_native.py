"""The native PostgreSQL path of impl.aio: the hot path on psycopg's async connections,
not on the store's threads; cancellation as on the thread path; a store used from a
later event loop falls back to its threads."""

from __future__ import annotations

import asyncio
import threading
import uuid

import psycopg
import pytest
from psycopg import sql

import impl.aio
from impl.aio.store import AsyncStore
from model import Config, EffectContext, ManualClock, Store
from tests.aio.helpers import FLOW, run_checked
from tests.pg import PG_URL, postgres_factory, require_postgres

pytestmark = pytest.mark.postgres


def _opener(*, threads: int = 1, native: bool = True) -> tuple[AsyncStore, Config]:
    """A store on this process's test schema (emptied here, off the loop)."""
    require_postgres()
    make, _ = postgres_factory(ManualClock())
    opened: list[Store] = []

    def open_sync() -> Store:
        opened.append(make())
        return opened[-1]

    probe = make()
    config = probe.config
    probe.close()
    return AsyncStore(open_sync, threads=threads, native=native), config  # type: ignore[arg-type]


def test_the_hot_path_does_not_wait_for_the_store_thread() -> None:
    """With the one store thread held by a slow call, a job still goes from plan to its
    end: plan, lease_next, run_effect, advance and fail never use that thread."""
    opener, _ = _opener(threads=1)
    gate = threading.Event()

    async def main() -> str:
        async with opener as store:
            assert store.native
            await store.register(FLOW)
            held = asyncio.ensure_future(store.call(lambda s: gate.wait(30)))
            await asyncio.sleep(0.05)  # the thread is now inside the slow call
            try:
                [job_id] = await store.plan_many("flow", [{"n": 1}])
                second = await store.plan("flow", {"n": 2})
                lease = await store.lease_next("w")
                assert lease is not None
                lease = await store.renew(lease)

                async def fn(ctx: EffectContext) -> int:
                    return 1

                assert await store.run_effect(lease, "op", fn) == 1
                assert await store.advance(lease, "B") is True
                assert await store.advance(lease, "C") is True
                other = await store.lease_next("w")
                assert other is not None
                assert other.job_id == second
                await store.release(other)
                other = await store.lease_next("w")
                assert other is not None
                await store.fail(other, "boom", retryable=False)
                assert not held.done()  # all of it while the thread was busy
            finally:
                gate.set()
            await held
            return await store.state(job_id)

    assert run_checked(main()) == "C"


def test_a_cancelled_call_waits_for_its_native_transaction() -> None:
    """An advance waiting on a row another session locks is cancelled: the cancellation
    lands only after its transaction, which committed; never half an advance."""
    opener, config = _opener()

    async def main() -> None:
        async with opener as store:
            await store.register(FLOW)
            job_id = await store.plan("flow", {"n": 1})
            lease = await store.lease_next("w")
            assert lease is not None
            blocker = await psycopg.AsyncConnection.connect(PG_URL)
            try:
                await blocker.execute(
                    sql.SQL("SET search_path TO {}").format(sql.Identifier(config.postgres_schema))
                )
                await blocker.execute("SELECT 1 FROM jobs WHERE job_id = %s FOR UPDATE", [job_id])
                task = asyncio.create_task(store.advance(lease, "B"))
                await asyncio.sleep(0.3)  # the advance now waits for the row
                task.cancel()
                await asyncio.sleep(0.1)
                assert not task.done()  # the cancellation waits for the transaction
                await blocker.rollback()
            finally:
                await blocker.close()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await store.state(job_id) == "B"
            assert await store.advance(lease, "C") is True  # its connection still works

    run_checked(main())


def test_a_store_used_from_a_later_loop_takes_its_threads() -> None:
    """The pool belongs to the loop that opened the store; a later ``asyncio.run`` uses
    the store's threads instead, and closing from there drops the ended loop's pool."""
    opener, _ = _opener()

    async def first() -> str:
        await opener.open()
        assert opener.native
        await opener.register(FLOW)
        return await opener.plan("flow", {"n": 1})

    async def later(job_id: str) -> str:
        lease = await opener.lease_next("w")
        assert lease is not None
        assert await opener.advance(lease, "B") is True
        state = await opener.state(job_id)
        await opener.close()
        return state

    job_id = run_checked(first())
    assert run_checked(later(job_id)) == "B"


def test_native_false_keeps_the_thread_path() -> None:
    opener, _ = _opener(native=False)

    async def main() -> bool:
        async with opener as store:
            return store.native

    assert run_checked(main()) is False
    assert impl.aio.open_store("memory:", native=True) is not None  # the flag is accepted


def _kill(app: str, *, waiting: bool = False) -> int:
    """Terminate the sessions named ``app`` (only those waiting on a lock, if ``waiting``)."""
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = %s AND (NOT %s OR wait_event_type = 'Lock')",
            [app, waiting],
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_killed_sessions_are_replaced_and_a_call_killed_inside_raises_storage_error() -> None:
    """The server kills every session of the store: the next native call reconnects by
    itself; a call whose session is killed while it waits inside its transaction raises
    StorageError (nothing changed), and the call after it works."""
    require_postgres()
    from impl.postgres.store import PostgresStore
    from model import StorageError

    app = f"victim_{uuid.uuid4().hex[:12]}"
    make, _ = postgres_factory(ManualClock())
    probe = make()
    config = probe.config
    probe.close()
    url = f"{PG_URL}?application_name={app}"
    opener = AsyncStore(lambda: PostgresStore(url, config=config))  # type: ignore[arg-type,return-value]

    async def main() -> None:
        async with opener as store:
            assert store.native
            await store.register(FLOW)
            job_id = await store.plan("flow", {"n": 1})
            assert await asyncio.to_thread(_kill, app) > 0
            lease = await store.lease_next("w")  # on a fresh connection
            assert lease is not None
            async with await psycopg.AsyncConnection.connect(PG_URL) as blocker:
                await blocker.execute(
                    sql.SQL("SELECT 1 FROM {} WHERE job_id = %s FOR UPDATE").format(
                        sql.Identifier(config.postgres_schema, "jobs")
                    ),
                    [job_id],
                )
                call = asyncio.create_task(store.advance(lease, "B"))
                while await asyncio.to_thread(_kill, app, waiting=True) == 0:
                    assert not call.done(), call
                    await asyncio.sleep(0.02)
                with pytest.raises(StorageError):
                    await call
                await blocker.rollback()
            assert await store.state(job_id) == "A"  # the killed advance changed nothing
            assert await store.advance(lease, "B") is True

    run_checked(main())


def test_native_sessions_run_without_jit() -> None:
    """The async pool's sessions are set up as the sync ones: JIT off (a planner that
    overprices a statement at ten million jobs would otherwise compile it for longer
    than it runs)."""
    opener, _ = _opener()

    async def main() -> list[str]:
        async with opener as store:
            assert store._native is not None
            seen = []
            for _ in range(2):
                async with store._native.db._pool.connection() as conn:
                    cur = await conn.execute("SELECT current_setting('jit')")
                    row = await cur.fetchone()
                    assert row is not None
                    seen.append(str(row[0]))
            return seen

    assert asyncio.run(main()) == ["off", "off"]
