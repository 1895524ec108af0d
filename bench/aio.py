"""Benchmark: ``AsyncWorker(concurrency=256)`` on I/O-bound handlers, beside the threaded
``Worker`` at the same concurrency, on SQLite and PostgreSQL.

Each job's handler runs one effect that waits 20 ms (``await asyncio.sleep`` for the async
worker, ``time.sleep`` for the threaded one: the same I/O wait, in each one's idiom) and
advances to the terminal state. The measure is **efficiency** against the ideal, where
256 handlers do nothing but wait: ``ideal = jobs x 20 ms / 256``, efficiency = ideal /
the time ``run(until_idle=True)`` took. 1.0 means the ledger costs nothing; the rest is
the ledger's transactions (three per job: lease, effect start, and the effect's result
with the advance, ``then="DONE"``) and the runtime's scheduling. The ratio is the async
worker's efficiency over the threaded one's, per run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import cast

import attrs

import impl
import impl.aio
from bench import ledger, rawpg
from bench.harness import Result, Settings, compare, stopwatch
from model.effectstep import SteppedStore

CONCURRENCY = 256
WAIT = 0.020
CAP = 20.0
"""Real seconds a run may take before its worker is stopped: the threaded Worker's 256
SQLite connections can spend minutes in busy timeouts (efficiency then counts the jobs it
finished in that time, and the note says how many attempts failed)."""


failures: defaultdict[tuple[str, str], list[int]] = defaultdict(list)


def _jobs(settings: Settings) -> int:
    return CONCURRENCY * (4 if settings.quick else 12)


def _ideal(n: int) -> float:
    return n * WAIT / CONCURRENCY


async def _async_handler(ctx: impl.aio.AsyncJobContext) -> None:
    async def wait(_ctx: impl.EffectContext) -> None:
        await asyncio.sleep(WAIT)

    await ctx.effect("io", wait, then="DONE")


def _sync_handler(ctx: impl.JobContext) -> None:
    def wait(_ctx: impl.EffectContext) -> None:
        time.sleep(WAIT)

    ctx.effect("io", wait, then="DONE")


def _target(settings: Settings, backend: str) -> tuple[str, impl.Config, Callable[[], None]]:
    """A fresh ledger: (target, config, cleanup)."""
    if backend == "sqlite":
        path = settings.scratch("aio") / "ledger.sqlite"
        return str(path), impl.Config(), lambda: None
    assert settings.pg_url is not None
    url = settings.pg_url
    schema = f"bench_aio_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    return url, impl.Config(postgres_schema=schema), lambda: rawpg.drop(url, schema)


def _async_run(settings: Settings, backend: str, n: int) -> float:
    target, config, cleanup = _target(settings, backend)

    def make() -> SteppedStore:
        store = impl.open_store(target, config=config)
        store.register(ledger.WORKFLOW)
        store.plan_many(ledger.KIND, ledger.identities(n))
        return cast(SteppedStore, store)

    threads = impl.aio.store.POSTGRES_THREADS if backend == "postgres" else 1

    async def main() -> impl.RunReport:
        async with impl.aio.AsyncStore(make, threads=threads) as store:
            worker = impl.aio.AsyncWorker(
                store, {ledger.KIND: _async_handler}, concurrency=CONCURRENCY, idle_poll=0.01
            )
            asyncio.get_running_loop().call_later(CAP, worker.stop)
            with stopwatch() as t:
                report = await worker.run(until_idle=True)
        elapsed.append(t[0])
        return report

    elapsed: list[float] = []
    try:
        report = asyncio.run(main())
    finally:
        cleanup()
    failures[("AsyncWorker", backend)].append(report.failed)
    return _ideal(report.finished) / elapsed[0]


def _thread_run(settings: Settings, backend: str, n: int) -> float:
    target, config, cleanup = _target(settings, backend)
    try:
        with impl.open_store(target, config=config) as store:  # type: ignore[attr-defined]
            store.register(ledger.WORKFLOW)
            store.plan_many(ledger.KIND, ledger.identities(n))
            worker = impl.Worker(
                store, {ledger.KIND: _sync_handler}, concurrency=CONCURRENCY, idle_poll=0.01
            )
            timer = threading.Timer(CAP, worker.stop)
            timer.start()
            with stopwatch() as t:
                report = worker.run(until_idle=True)
            timer.cancel()
    finally:
        cleanup()
    failures[("threaded Worker", backend)].append(report.failed)
    return _ideal(report.finished) / t[0]


def run(settings: Settings) -> list[Result]:
    n = _jobs(settings)
    backends = ["sqlite"] + (["postgres"] if settings.pg_url else [])
    results = []
    # The runtimes log every failed attempt; hundreds of busy timeouts would bury the
    # benchmark's own output, so they are counted instead (the note).
    logging.getLogger("jobledger").setLevel(logging.CRITICAL)
    for backend in backends:
        result = compare(
            settings.runs,
            bench="aio",
            case=f"{backend}: {n} jobs of one 20 ms wait, concurrency {CONCURRENCY}, "
            f"efficiency vs ideal {_ideal(n):.2f} s",
            unit="of ideal",
            subject=("AsyncWorker", lambda _i, b=backend: _async_run(settings, b, n)),
            baseline=("threaded Worker", lambda _i, b=backend: _thread_run(settings, b, n)),
        )
        note = "failed attempts per run (busy timeouts): " + ", ".join(
            f"{who} {failures[(who, backend)]}" for who in ("AsyncWorker", "threaded Worker")
        )
        results.append(attrs.evolve(result, note=note))
    return results
