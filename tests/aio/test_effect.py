"""run_effect on the async face: fn on the loop, its durable steps on the store's thread,
and cancellation as the model says: inside fn a crash (the start stays), inside a step
whole or nothing."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

import impl.aio
from model import (
    ConfigError,
    EffectContext,
    EffectInDoubt,
    EffectStatus,
    InvalidInput,
    ManualClock,
    StorageError,
)
from tests.aio.helpers import FLOW, run_checked


def _target(tmp_path: Path) -> str:
    return str(tmp_path / "jobs.sqlite")


def test_fn_runs_on_the_loop_and_its_result_is_recorded_once(tmp_path: Path) -> None:
    calls: list[str] = []

    async def main() -> None:
        async with impl.aio.open_store(_target(tmp_path)) as store:
            await store.register(FLOW)
            await store.plan("flow", {"n": 1})
            lease = await store.lease_next("w")
            assert lease is not None
            loop_thread = threading.current_thread()

            async def fn(ctx: EffectContext) -> int:
                assert threading.current_thread() is loop_thread
                calls.append(ctx.op_key)
                await asyncio.sleep(0.01)
                return 7

            assert await store.run_effect(lease, "op", fn) == 7
            assert await store.run_effect(lease, "op", fn) == 7  # replayed, fn not called
            [effect] = await store.effects(lease.job_id)
            assert effect.status == EffectStatus.DONE

    run_checked(main())
    assert len(calls) == 1


def test_an_exception_from_fn_removes_the_start_and_propagates(tmp_path: Path) -> None:
    class Boom(Exception):
        pass

    async def main() -> None:
        async with impl.aio.open_store(_target(tmp_path)) as store:
            await store.register(FLOW)
            await store.plan("flow", {"n": 1})
            lease = await store.lease_next("w")
            assert lease is not None
            boom = Boom("no")

            async def fn(ctx: EffectContext) -> None:
                raise boom

            with pytest.raises(Boom) as caught:
                await store.run_effect(lease, "op", fn)
            assert caught.value is boom
            assert await store.effects(lease.job_id) == []

    run_checked(main())


def test_a_sync_fn_is_refused_and_its_start_removed(tmp_path: Path) -> None:
    async def main() -> None:
        async with impl.aio.open_store(_target(tmp_path)) as store:
            await store.register(FLOW)
            await store.plan("flow", {"n": 1})
            lease = await store.lease_next("w")
            assert lease is not None
            with pytest.raises(InvalidInput, match="async"):
                await store.run_effect(lease, "op", lambda ctx: 1)  # type: ignore[arg-type,return-value]
            assert await store.effects(lease.job_id) == []

    run_checked(main())


def test_cancelled_inside_fn_the_start_stays_and_is_in_doubt_after_the_lease(
    tmp_path: Path,
) -> None:
    """A cancelled task is a crash at that await: unlike an exception, the start stays."""
    clock = ManualClock()

    async def main() -> None:
        async with impl.aio.open_store(_target(tmp_path), clock=clock) as store:
            await store.register(FLOW)
            await store.plan("flow", {"n": 1})
            lease = await store.lease_next("w", ttl=10)
            assert lease is not None
            entered = asyncio.Event()

            async def fn(ctx: EffectContext) -> int:
                entered.set()
                await asyncio.Event().wait()  # the world is slow: never returns
                return 1

            task = asyncio.create_task(store.run_effect(lease, "op", fn))
            await entered.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            [effect] = await store.effects(lease.job_id)
            assert effect.status == EffectStatus.STARTED
            clock.advance(11)  # the lease dies
            assert (await store.stats()).in_doubt == 1
            again = await store.lease_next("w2")
            assert again is not None

            async def never(ctx: EffectContext) -> int:
                raise AssertionError("fn must not run for an op in doubt with 'raise'")

            with pytest.raises(EffectInDoubt):
                await store.run_effect(again, "op", never, on_doubt="raise")

            async def probe(info: object) -> int:
                await asyncio.sleep(0)
                return 42  # an async probe found it done

            assert await store.run_effect(again, "op", never, on_doubt=probe) == 42

    run_checked(main())


def test_cancelled_while_its_step_waits_the_step_commits_whole(tmp_path: Path) -> None:
    """A plan waiting on a locked database is cancelled: the cancellation lands only
    after the transaction, which committed, so the job exists; never half a plan."""
    path = tmp_path / "jobs.sqlite"

    async def main() -> None:
        async with impl.aio.open_store(str(path)) as store:
            await store.register(FLOW)
            blocker = sqlite3.connect(path, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")
            task = asyncio.create_task(store.plan("flow", {"n": 1}))
            await asyncio.sleep(0.2)  # the plan is now waiting for the write lock
            task.cancel()
            await asyncio.sleep(0.1)
            assert not task.done()  # the cancellation waits for the step
            blocker.execute("COMMIT")
            blocker.close()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert len(await store.jobs()) == 1

    run_checked(main())


def test_the_loop_stays_free_while_a_step_waits_for_a_lock(tmp_path: Path) -> None:
    """A step waits 0.5 s on a write lock held elsewhere; meanwhile a ticker on the loop
    keeps ticking and debug mode reports no blocked callback. The detector itself is
    checked: a 0.5 s blocking sleep on the same kind of loop is reported."""
    path = tmp_path / "jobs.sqlite"
    ticks_while_waiting: list[int] = []

    async def main() -> None:
        async with impl.aio.open_store(str(path)) as store:
            await store.register(FLOW)
            blocker = sqlite3.connect(path, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")
            ticks = 0
            stop = asyncio.Event()

            async def tick() -> None:
                nonlocal ticks
                while not stop.is_set():
                    await asyncio.sleep(0.01)
                    ticks += 1

            ticker = asyncio.create_task(tick())
            planned = asyncio.create_task(store.plan("flow", {"n": 1}))
            await asyncio.sleep(0.5)
            assert not planned.done()  # still waiting for the lock...
            ticks_while_waiting.append(ticks)  # ...while the loop went on
            blocker.execute("COMMIT")
            blocker.close()
            await planned
            stop.set()
            await ticker

    run_checked(main())
    # About 50 at 10 ms; a loop blocked by the step would not tick at all.
    assert ticks_while_waiting[0] >= 10

    async def blocks() -> None:
        time.sleep(0.5)  # what a sync store call waiting on a lock would do on the loop

    with pytest.raises(AssertionError, match="blocked"):
        run_checked(blocks())


def test_a_store_used_outside_its_block_says_so(tmp_path: Path) -> None:
    async def main() -> None:
        store = impl.aio.open_store(_target(tmp_path))
        with pytest.raises(StorageError, match="not open"):
            await store.plan("flow", {"n": 1})
        async with store:
            await store.register(FLOW)
        with pytest.raises(StorageError, match="not open"):
            await store.run_effect(None, "op", None)  # type: ignore[arg-type]
        await store.close()  # closing twice is harmless

    run_checked(main())


def test_a_bad_target_raises_the_sync_store_s_error_when_opened() -> None:
    async def main() -> None:
        with pytest.raises(ConfigError, match="unknown scheme"):
            async with impl.aio.open_store("ftp://example.org/jobs"):
                pass

    run_checked(main())
