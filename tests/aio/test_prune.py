"""prune on the async face: the archive callback runs off the prune's thread (an
``async def`` on the loop, a plain function on a thread, never on the loop) before each
batch's delete commits, and its own calls to the store run inside the prune instead of
waiting for it (which was a deadlock on SQLite's single store thread)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import impl.aio
from impl.aio.store import POSTGRES_THREADS, AsyncStore
from model import ManualClock
from model.retention import PrunedJob, PruneReport
from tests.aio.helpers import FLOW, run_checked

BACKENDS = ["memory", "sqlite", "postgres"]


def _opener(backend: str, tmp_path: Path, clock: ManualClock) -> AsyncStore:
    """The store to open (call it off the loop: PostgreSQL's test schema is emptied here)."""
    if backend == "postgres":
        from tests.pg import postgres_factory, require_postgres

        require_postgres()
        # This process's test schema (tests/pg.py), emptied for this test.
        make, _ = postgres_factory(clock)
        return AsyncStore(make, threads=POSTGRES_THREADS)  # type: ignore[arg-type]
    target = "memory:" if backend == "memory" else str(tmp_path / "jobs.sqlite")
    return impl.aio.open_store(target, clock=clock)


async def _finish(store: AsyncStore, n: int) -> str:
    job_id = await store.plan("flow", {"n": n})
    lease = await store.lease_next("w")
    assert lease is not None
    assert lease.job_id == job_id

    async def fn(_: Any) -> int:
        return n

    await store.run_effect(lease, "op", fn)
    await store.advance(lease, "B")
    await store.advance(lease, "C")
    return job_id


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_async_archive_reads_the_store_inside_the_prune(backend: str, tmp_path: Path) -> None:
    clock = ManualClock()
    opener = _opener(backend, tmp_path, clock)
    seen: list[list[str]] = []
    progress: list[int] = []

    async def main() -> tuple[list[str], PruneReport, list[str]]:
        async with opener as store:
            await store.register(FLOW)
            ids = [await _finish(store, n) for n in range(5)]
            clock.advance(1)
            loop_thread = threading.current_thread()
            late: list[asyncio.Task[str]] = []

            async def archive(jobs: Sequence[PrunedJob]) -> None:
                assert threading.current_thread() is loop_thread
                for pruned in jobs:
                    # Not deleted yet: the batch commits after the archive returns.
                    assert await store.job(pruned.job.job_id) == pruned.job
                    assert await store.effects(pruned.job.job_id) == list(pruned.effects)
                seen.append([p.job.job_id for p in jobs])
                # A call started here but awaited after the batch: it finds the prune's
                # side queue closed and goes to the store's own thread.
                late.append(asyncio.create_task(store.state(ids[-1])))
                await asyncio.sleep(0)

            async def note(report: PruneReport) -> None:
                progress.append(report.jobs)

            report = await store.prune(
                finished_before=await store.now(), batch_size=2, archive=archive, progress=note
            )
            states = [await task for task in late]
            return ids, report, [*states, str(len(await store.jobs()))]

    ids, report, states = run_checked(main())
    assert seen == [ids[0:2], ids[2:4], ids[4:]]
    assert (report.jobs, report.batches) == (5, 3)
    assert progress == [2, 4, 5]
    assert states == ["C", "C", "C", "0"]  # the late reads, then no job left


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sync_archive_runs_on_a_thread_and_may_block_it(backend: str, tmp_path: Path) -> None:
    """A plain archive writes and fsyncs: it runs on a thread, never on the loop (a 0.5 s
    sleep there would fail run_checked), nor as one of the store's own steps."""
    clock = ManualClock()
    opener = _opener(backend, tmp_path, clock)
    threads: list[threading.Thread] = []

    async def main() -> PruneReport:
        async with opener as store:
            await store.register(FLOW)
            for n in range(3):
                await _finish(store, n)
            clock.advance(1)

            def archive(jobs: Sequence[PrunedJob]) -> None:
                threads.append(threading.current_thread())
                time.sleep(0.5)

            return await store.prune(finished_before=await store.now(), archive=archive)

    report = run_checked(main())
    assert report.jobs == 3
    assert len(threads) == 1
    assert threads[0] is not threading.main_thread()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_async_archive_that_raises_keeps_its_batch(backend: str, tmp_path: Path) -> None:
    clock = ManualClock()
    opener = _opener(backend, tmp_path, clock)

    async def main() -> tuple[list[str], list[str]]:
        async with opener as store:
            await store.register(FLOW)
            ids = [await _finish(store, n) for n in range(4)]
            clock.advance(1)
            calls: list[int] = []

            async def archive(jobs: Sequence[PrunedJob]) -> None:
                calls.append(len(jobs))
                if len(calls) == 2:
                    raise OSError("disk full")

            with pytest.raises(OSError, match="disk full"):
                await store.prune(finished_before=await store.now(), batch_size=2, archive=archive)
            return ids, sorted(j.job_id for j in await store.jobs())

    ids, left = run_checked(main())
    assert left == sorted(ids[2:])
