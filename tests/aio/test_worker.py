"""AsyncWorker: many handlers on one loop, renewal as a task, RetryLater, failures, and
the three ways to stop (stop(), a signal, cancellation), each releasing its leases."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import impl
import impl.aio
from model import Config, EffectContext, EffectStatus, Event, ManualClock
from tests.aio.helpers import FLOW, run_checked

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ["memory", "sqlite", "postgres"]


def _target(backend: str, tmp_path: Path) -> str:
    if backend == "memory":
        return "memory:"
    if backend == "sqlite":
        return str(tmp_path / "jobs.sqlite")
    from tests.pg import PG_URL, require_postgres

    require_postgres()
    return PG_URL


def _fresh(backend: str, tmp_path: Path) -> impl.aio.AsyncStore:
    """An empty ledger of ``backend`` (on PostgreSQL, this process's emptied test schema)."""
    if backend == "postgres":
        from impl.aio.store import POSTGRES_THREADS, AsyncStore
        from tests.pg import postgres_factory, require_postgres

        require_postgres()
        make, _ = postgres_factory(ManualClock())
        return AsyncStore(make, threads=POSTGRES_THREADS)  # type: ignore[arg-type]
    return impl.aio.open_store(_target(backend, tmp_path))


async def _three_steps(ctx: impl.aio.AsyncJobContext) -> None:
    async def fetch(ectx: EffectContext) -> dict[str, str]:
        await asyncio.sleep(0.005)
        return {"key": ectx.op_key}

    await ctx.effect("fetch", fetch)
    await ctx.advance("B")
    await ctx.advance("C")


@pytest.mark.parametrize("backend", BACKENDS)
def test_effect_then_advances_with_the_result(backend: str, tmp_path: Path) -> None:
    """``await ctx.effect(..., then=)``: the move is taken with the record, the context
    follows it, and a terminal ``then`` finishes the job."""
    seen: list[tuple[str, bool]] = []

    async def handler(ctx: impl.aio.AsyncJobContext) -> None:
        async def fetch(ectx: EffectContext) -> str:
            return ectx.op

        await ctx.effect("fetch", fetch, then="B")
        seen.append((ctx.state, ctx.advanced))
        await ctx.effect("store", fetch, then="C")
        seen.append((ctx.state, ctx.is_terminal()))

    opener = _fresh(backend, tmp_path)  # off the loop: it empties a schema on PostgreSQL

    async def main() -> list[str]:
        async with opener as store:
            await store.register(FLOW)
            jid = await store.plan("flow", {"n": 1})
            report = await impl.aio.AsyncWorker(store, {"flow": handler}).run(until_idle=True)
            assert (report.finished, report.failed) == (1, 0)
            info = await store.job(jid)
            assert (info.state, info.lease) == ("C", None)
            return [str(h.event) for h in await store.history(jid)]

    history = run_checked(main())
    assert seen == [("B", True), ("C", True)]
    assert history[-6:] == [
        "effect_started",
        "effect_recorded",
        "advanced",
        "effect_started",
        "effect_recorded",
        "advanced",
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_tasks_finish_every_job_with_each_effect_recorded_once(
    backend: str, tmp_path: Path
) -> None:
    opener = _fresh(backend, tmp_path)

    async def main() -> tuple[impl.RunReport, list[str], int]:
        async with opener as store:
            await store.register(FLOW)
            ids = await store.plan_many("flow", [{"n": i} for i in range(40)])
            report = await impl.aio.AsyncWorker(store, {"flow": _three_steps}, concurrency=8).run(
                until_idle=True
            )
            states = [await store.state(i) for i in ids]
            effects = [e for i in ids for e in await store.effects(i)]
            done = sum(e.status == EffectStatus.DONE for e in effects)
            return report, states, done

    report, states, done = run_checked(main())
    assert (report.jobs, report.finished, report.failed, report.lost) == (40, 40, 0, 0)
    assert states == ["C"] * 40
    assert done == 40


def test_renewal_task_keeps_a_slow_handler_s_lease(tmp_path: Path) -> None:
    async def slow(ctx: impl.aio.AsyncJobContext) -> None:
        await asyncio.sleep(1.2)  # 2 TTLs: without renewal the lease would be lost
        await ctx.advance("B")
        await ctx.advance("C")

    async def main() -> tuple[impl.RunReport, list[Event]]:
        config = Config(lease_ttl=0.6)
        async with impl.aio.open_store(str(tmp_path / "j.sqlite"), config=config) as store:
            await store.register(FLOW)
            jid = await store.plan("flow", {"n": 1})
            worker = impl.aio.AsyncWorker(store, {"flow": slow}, renew_every=0.15)
            report = await worker.run(until_idle=True)
            return report, [h.event for h in await store.history(jid)]

    report, events = run_checked(main())
    assert (report.finished, report.lost) == (1, 0)
    assert Event.RENEWED in events


def test_retry_later_releases_with_its_delay_and_spends_no_attempt(tmp_path: Path) -> None:
    clock = ManualClock()

    async def down(ctx: impl.aio.AsyncJobContext) -> None:
        raise impl.RetryLater("the host is down \x00", delay=30.0)

    async def main() -> tuple[impl.RunReport, impl.JobInfo, list[impl.HistoryEvent]]:
        async with impl.aio.open_store(str(tmp_path / "j.sqlite"), clock=clock) as store:
            await store.register(FLOW)
            jid = await store.plan("flow", {"n": 1})
            # Bounded: a worker that released with no delay would lease it again forever.
            report = await asyncio.wait_for(
                impl.aio.AsyncWorker(store, {"flow": down}).run(until_idle=True), 20
            )
            return report, await store.job(jid), await store.history(jid)

    report, job, history = run_checked(main())
    assert (report.jobs, report.released, report.failed) == (1, 1, 0)
    assert job.attempts == 0
    assert job.run_at == pytest.approx(clock() + 30.0)
    assert history[-1].event == Event.RELEASED
    # The reason is kept, a NUL escaped (no store keeps a NUL in a text).
    assert dict(history[-1].detail) == {"reason": "the host is down \\x00"}


def test_an_exception_fails_the_attempt_with_backoff(tmp_path: Path) -> None:
    clock = ManualClock()

    async def broken(ctx: impl.aio.AsyncJobContext) -> None:
        raise ValueError("bad data")

    async def main() -> impl.JobInfo:
        async with impl.aio.open_store(str(tmp_path / "j.sqlite"), clock=clock) as store:
            await store.register(FLOW)
            jid = await store.plan("flow", {"n": 1})
            report = await impl.aio.AsyncWorker(store, {"flow": broken}).run(until_idle=True)
            assert report.failed == 1
            return await store.job(jid)

    job = run_checked(main())
    assert job.attempts == 1
    assert job.last_error == "ValueError: bad data"
    assert job.run_at == pytest.approx(clock() + Config().backoff(1))


def test_stop_lets_the_running_effect_finish_then_releases(tmp_path: Path) -> None:
    async def main() -> None:
        async with impl.aio.open_store(str(tmp_path / "j.sqlite")) as store:
            await store.register(FLOW)
            jid = await store.plan("flow", {"n": 1})
            worker: impl.aio.AsyncWorker

            async def handler(ctx: impl.aio.AsyncJobContext) -> None:
                async def fn(ectx: EffectContext) -> str:
                    worker.stop()  # a stop arrives while the effect runs
                    await asyncio.sleep(0.05)
                    return "done"

                await ctx.effect("e", fn)
                await ctx.advance("B")  # StopRequested here

            worker = impl.aio.AsyncWorker(store, {"flow": handler})
            report = await worker.run()
            assert (report.released, report.failed) == (1, 0)
            job = await store.job(jid)
            assert (job.state, job.attempts, job.lease) == ("A", 0, None)
            [effect] = await store.effects(jid)
            assert effect.status == EffectStatus.DONE

    run_checked(main())


def test_cancelling_run_releases_the_lease_and_leaves_the_effect_started(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with impl.aio.open_store(str(tmp_path / "j.sqlite")) as store:
            await store.register(FLOW)
            jid = await store.plan("flow", {"n": 1})
            inside = asyncio.Event()

            async def handler(ctx: impl.aio.AsyncJobContext) -> None:
                async def fn(ectx: EffectContext) -> str:
                    inside.set()
                    await asyncio.sleep(60)
                    return "never"

                await ctx.effect("e", fn)

            running = asyncio.create_task(
                impl.aio.AsyncWorker(store, {"flow": handler}, concurrency=3).run()
            )
            await inside.wait()
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
            job = await store.job(jid)
            assert (job.lease, job.attempts) == (None, 0)  # released: no attempt spent
            [effect] = await store.effects(jid)
            assert effect.status == EffectStatus.STARTED
            assert (await store.stats()).in_doubt == 1  # its lease is dead

    run_checked(main())


SIGNAL_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    import impl.aio
    from model import Workflow

    FLOW = Workflow("flow", ["A", "B", "C"], [("A", "B"), ("B", "C")], initial="A",
                    terminal=["C"])

    async def handler(ctx):
        print("running", flush=True)
        await ctx.effect("wait", wait)
        await ctx.advance("B")

    async def wait(ctx):
        await asyncio.sleep(1.0)
        return "slept"

    async def main():
        async with impl.aio.open_store(sys.argv[1]) as store:
            await store.register(FLOW)
            await store.plan("flow", {"n": 1})
            report = await impl.aio.AsyncWorker(store, {"flow": handler}).run()
            print("report", report.released, report.failed, flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_main_program_after_the_effect_releasing_the_lease(
    sig: signal.Signals, tmp_path: Path
) -> None:
    db = tmp_path / "j.sqlite"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGNAL_SCRIPT, str(db)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "running"
        time.sleep(0.2)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert "report 1 0" in out
    store = impl.open_store(db)
    [job] = store.jobs()
    assert (job.state, job.attempts, job.lease) == ("A", 0, None)
    assert [e.status for e in store.effects(job.job_id)] == [EffectStatus.DONE]
    store.close()


def test_bad_arguments_are_refused_with_typed_errors(tmp_path: Path) -> None:
    async def main() -> None:
        async with impl.aio.open_store(str(tmp_path / "j.sqlite")) as store:
            with pytest.raises(impl.InvalidInput, match="at least one handler"):
                impl.aio.AsyncWorker(store, {})
            with pytest.raises(impl.InvalidInput, match="concurrency"):
                impl.aio.AsyncWorker(store, {"flow": _three_steps}, concurrency=0)
            with pytest.raises(impl.UnknownWorkflow):
                await impl.aio.AsyncWorker(store, {"nope": _three_steps}).run(until_idle=True)

    run_checked(main())


def test_a_permanent_error_fails_the_job_for_good(tmp_path: Path) -> None:
    class NotFound(Exception):
        retryable = False

    async def gone(ctx: impl.aio.AsyncJobContext) -> None:
        raise NotFound("404")

    async def main() -> impl.JobInfo:
        async with impl.aio.open_store(str(tmp_path / "j.sqlite")) as store:
            await store.register(FLOW)
            jid = await store.plan("flow", {"n": 1})
            await impl.aio.AsyncWorker(store, {"flow": gone}).run(until_idle=True)
            return await store.job(jid)

    job = run_checked(main())
    assert (job.state, job.last_error) == ("FAILED", "NotFound: 404")


def test_a_lease_lost_to_the_operator_is_seen_by_the_renewal_task(tmp_path: Path) -> None:
    """An operator cancels the job while its handler waits; the renewal task finds the
    lease lost, and the handler's next call raises LeaseLost without touching the store."""

    async def main() -> tuple[impl.RunReport, impl.JobInfo]:
        async with impl.aio.open_store(str(tmp_path / "j.sqlite")) as store:
            await store.register(FLOW)
            jid = await store.plan("flow", {"n": 1})
            seen: list[BaseException] = []

            async def handler(ctx: impl.aio.AsyncJobContext) -> None:
                await store.cancel(ctx.job_id, "operator: stop that")
                await asyncio.sleep(0.3)  # renewals every 0.05 s meanwhile
                assert ctx.lost
                try:
                    await ctx.advance("B")
                except impl.LeaseLost as exc:
                    seen.append(exc)
                    raise

            worker = impl.aio.AsyncWorker(store, {"flow": handler}, renew_every=0.05)
            report = await worker.run(until_idle=True)
            assert len(seen) == 1
            assert "renewal" in str(seen[0])
            return report, await store.job(jid)

    report, job = run_checked(main())
    assert (report.lost, report.failed, report.finished) == (1, 0, 0)
    assert (job.state, job.last_error) == ("FAILED", "operator: stop that")


def test_a_cancelled_error_of_the_handler_s_own_fails_the_job_not_the_worker(
    tmp_path: Path,
) -> None:
    """A CancelledError that escapes a handler while nobody cancelled the worker (a cancel
    scope or a timeout inside it) is the handler failing: the worker goes on."""

    async def leaky(ctx: impl.aio.AsyncJobContext) -> None:
        inner = asyncio.create_task(asyncio.sleep(10))
        inner.cancel()
        await inner  # raises CancelledError into the handler

    async def main() -> tuple[impl.RunReport, list[impl.JobInfo]]:
        async with impl.aio.open_store(str(tmp_path / "j.sqlite")) as store:
            await store.register(FLOW)
            await store.plan_many("flow", [{"n": 1}, {"n": 2}])
            report = await impl.aio.AsyncWorker(store, {"flow": leaky}).run(until_idle=True)
            return report, await store.jobs()

    report, jobs = run_checked(main())
    assert (report.jobs, report.failed, report.released) == (2, 2, 0)
    assert all(j.attempts == 1 and j.last_error.startswith("CancelledError") for j in jobs)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_an_idle_async_worker_starts_a_planned_job_without_waiting_for_its_poll(
    backend: str, tmp_path: Path
) -> None:
    """idle_poll is 30 s and the test waits at most 10: only the store's wake-up
    (data_version on SQLite, NOTIFY on PostgreSQL) can start the jobs in time."""
    if backend == "postgres":
        from tests.pg import PG_URL, require_postgres

        require_postgres()
        schema = f"aio_pickup_{os.getpid()}_{time.monotonic_ns()}"
        config = Config(postgres_schema=schema)
        target = PG_URL
    else:
        config = Config()
        target = str(tmp_path / "jobs.sqlite")
    started: list[str] = []

    async def handle(ctx: impl.aio.AsyncJobContext) -> None:
        started.append(ctx.job_id)
        await ctx.advance("B")
        await ctx.advance("C")

    async def scenario() -> float:
        async with impl.aio.open_store(target, config=config) as store:
            await store.register(FLOW)
            worker = impl.aio.AsyncWorker(store, {"flow": handle}, concurrency=4, idle_poll=30.0)
            running = asyncio.ensure_future(worker.run())
            await asyncio.sleep(0.5)  # every task is idle now
            planned_at = time.monotonic()
            async with impl.aio.open_store(target, config=config) as other:
                await other.plan_many("flow", [{"n": i} for i in range(3)])
            while len(started) < 3 and time.monotonic() - planned_at < 10:
                await asyncio.sleep(0.01)
            took = time.monotonic() - planned_at
            worker.stop()
            await asyncio.wait_for(running, 35)
            return took

    try:
        took = run_checked(scenario())
    finally:
        if backend == "postgres":
            import psycopg
            from psycopg import sql

            with psycopg.connect(PG_URL, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                )
    assert len(started) == 3, f"only {len(started)} of 3 jobs started in {took:.1f} s"
