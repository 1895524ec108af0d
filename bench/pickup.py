"""Benchmark: pickup latency into an idle system, and what an idle worker costs.

W worker processes (1, 4, 16) each run :class:`impl.Worker` with its default
``idle_poll`` on one ledger and have nothing to do. The parent then plans one job at a
time, with a random pause between two (so every worker is idle again), and measures the
wall-clock time from ``plan`` returning to the handler starting (the handler stamps
``time.time()`` first thing; both clocks are the machine's one real-time clock). After
that, every worker measures its own process CPU time over an idle period (a thread
blocked on a semaphore reads ``time.process_time()`` at its start and end, so the
measuring costs nothing itself), reported as percent of one core.

For reference, W = 1 also runs the worker as it was before ``Store.wait_for_work``:
sleeping ``idle_poll`` between two polls.

Targets (issue 17): median <= 10 ms, p99 <= 50 ms, idle CPU <= 1% of a core per worker.
With 100 samples the p99 is the second-largest sample.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import random
import signal
import statistics
import time
import uuid
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import impl
from bench import ledger
from bench.harness import Result, Series, Settings

WORKERS = (1, 4, 16)
MEDIAN_TARGET_MS = 10.0
P99_TARGET_MS = 50.0
CPU_TARGET_PERCENT = 1.0
PICKUP_TIMEOUT = 10.0


def _open(target: str) -> impl.Store:
    if target.startswith("postgresql://"):
        from impl.postgres.store import PostgresStore

        url, schema = target.split("#", 1)
        return PostgresStore(url, config=impl.Config(postgres_schema=schema))
    return ledger.open_sqlite(Path(target))


def _child(target: str, polling: bool, queues: tuple[Any, Any], idle: tuple[Event, Event]) -> None:
    import threading

    ready, started = queues
    idle_start, idle_end = idle

    store = _open(target)

    def handler(ctx: impl.JobContext) -> None:
        started.put((str(ctx.identity["n"]), time.time()))
        ctx.advance("DONE")

    worker = impl.Worker(store, {ledger.KIND: handler})
    if polling:
        # The worker as it was: sleep idle_poll between two polls, hear of nothing.
        worker._wait_for_work = lambda: worker._stopping.wait(worker.idle_poll)  # type: ignore[method-assign]

    def measure_idle() -> None:
        idle_start.wait()
        cpu = time.process_time()
        idle_end.wait()
        ready.put(("cpu", time.process_time() - cpu))

    threading.Thread(target=measure_idle, daemon=True).start()
    ready.put(("ready", os.getpid()))
    worker.run()
    store.close()


def _target(settings: Settings, backend: str) -> str:
    if backend == "sqlite":
        path = settings.scratch("pickup") / "ledger.sqlite"
        ledger.open_sqlite(path).close()
        return str(path)
    assert settings.pg_url is not None
    schema = f"bench_pickup_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    from impl.postgres.store import PostgresStore

    with PostgresStore(settings.pg_url, config=impl.Config(postgres_schema=schema)) as store:
        store.register(ledger.WORKFLOW)
    return f"{settings.pg_url}#{schema}"


def _drop(target: str) -> None:
    if target.startswith("postgresql://"):
        from bench import rawpg

        url, schema = target.split("#", 1)
        rawpg.drop(url, schema)


def measure(
    target: str, workers: int, samples: int, idle_seconds: float, *, polling: bool
) -> tuple[list[float], list[float]]:
    """Pickup latencies (ms) and idle CPU per worker (% of a core)."""
    ctx: Any = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    ready = ctx.Queue()
    started = ctx.Queue()
    idle_start, idle_end = ctx.Event(), ctx.Event()
    children = [
        ctx.Process(
            target=_child,
            args=(target, polling, (ready, started), (idle_start, idle_end)),
            daemon=True,
        )
        for _ in range(workers)
    ]
    for child in children:
        child.start()
    latencies: list[float] = []
    cpu: list[float] = []
    try:
        for _ in children:
            kind, _pid = ready.get(timeout=120)
            assert kind == "ready"
        time.sleep(1.0)  # every worker into its idle wait (the listener connected)
        store = _open(target)
        try:
            for i in range(samples):
                time.sleep(random.uniform(0.05, 0.15))
                store.plan(ledger.KIND, {"n": i, "run": uuid.uuid4().hex})
                planned = time.time()
                n, at = started.get(timeout=PICKUP_TIMEOUT)
                assert n == str(i), f"sample {i}: the handler started job {n}"
                latencies.append((at - planned) * 1000)
        finally:
            store.close()
        time.sleep(1.0)
        idle_start.set()
        began = time.monotonic()
        time.sleep(idle_seconds)
        idle_end.set()
        elapsed = time.monotonic() - began
        for _ in children:
            kind, seconds = ready.get(timeout=60)
            assert kind == "cpu"
            cpu.append(seconds / elapsed * 100)
    finally:
        for child in children:
            if child.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)
        for child in children:
            child.join(timeout=20)
            if child.is_alive():
                child.kill()
                child.join()
    return latencies, cpu


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def _results(
    backend: str, workers: int, lat: list[float], cpu: list[float], *, polling: bool
) -> list[Result]:
    median, p99 = statistics.median(lat), _p99(lat)
    label = f"{backend}, W={workers}" + (", polling as before (reference)" if polling else "")
    lat_ok = median <= MEDIAN_TARGET_MS and p99 <= P99_TARGET_MS
    cpu_ok = max(cpu) <= CPU_TARGET_PERCENT
    return [
        Result(
            bench="pickup",
            case=f"{label}: plan returned -> handler started",
            subject=Series(f"{len(lat)} samples", "ms", tuple(lat), higher=False),
            baseline=None,
            ratio=None,
            note=f"median {median:.1f} ms (target <= {MEDIAN_TARGET_MS:g}), p99 {p99:.1f} ms "
            f"(target <= {P99_TARGET_MS:g})"
            + ("" if polling else f": {'PASS' if lat_ok else 'MISS'}"),
            ok=lat_ok or polling,
        ),
        Result(
            bench="pickup",
            case=f"{label}: idle CPU per worker",
            subject=Series(f"{len(cpu)} workers", "% of a core", tuple(cpu), higher=False),
            baseline=None,
            ratio=None,
            note=f"max {max(cpu):.2f}% = {max(cpu) * 0.6:.2f} s per minute (target <= "
            f"{CPU_TARGET_PERCENT:g}%)" + ("" if polling else f": {'PASS' if cpu_ok else 'MISS'}"),
            ok=cpu_ok or polling,
        ),
    ]


def run(settings: Settings) -> list[Result]:
    samples = 30 if settings.quick else 100
    idle_seconds = 5.0 if settings.quick else 15.0
    backends = ["sqlite"]
    if settings.pg_url:
        try:
            import psycopg

            psycopg.connect(settings.pg_url, connect_timeout=3).close()
            backends.append("postgres")
        except Exception as exc:
            print(f"  PostgreSQL skipped: {settings.pg_url} is not reachable: {exc}")
    results: list[Result] = []
    for backend in backends:
        cases = [(w, False) for w in WORKERS] + [(1, True)]
        for workers, polling in cases:
            target = _target(settings, backend)
            try:
                lat, cpu = measure(
                    target,
                    workers,
                    samples if not polling else max(10, samples // 3),
                    idle_seconds,
                    polling=polling,
                )
            finally:
                _drop(target)
            found = _results(backend, workers, lat, cpu, polling=polling)
            for r in found:
                print(f"  {r.case}: {r.note}")
            results.extend(found)
    return results
