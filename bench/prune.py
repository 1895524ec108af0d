"""``prune`` throughput while a worker runs, and the worker's throughput meanwhile.

A ledger of finished jobs (built with bulk SQL: as for ``lease_next`` on SQLite, with
``generate_series`` on PostgreSQL) and one worker process, which runs the lifecycle
(lease, one no-op effect, advance) and notes when each job finished. The worker plans its
own work, a thousand jobs whenever it finds none, so it never runs dry: it runs until the
parent tells it to stop. Each run measures the worker alone for :data:`ALONE_SECONDS`
before and after the prune (its jobs/s over both windows: the baseline), and the same
worker while the parent prunes every finished job with the default batch (the subject:
the worker's jobs/s over the prune's window), and reports the prune's own rate (jobs
removed per second, with SQLite's incremental vacuum and checkpoint after it included)
and the longest pause the worker saw between two jobs. Target: the worker keeps at least
half its throughput while a prune runs.

(Until 2026-12-03 the worker drained a fixed backlog of 3,000 jobs and its rate was
counted over the whole prune: a worker that had finished early counted as a slow one, so
the ratio it printed, 0.10x-0.18x, measured the backlog's size, not the prune.)
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from bench import lease, ledger
from bench.harness import Result, Series, Settings, Target, fmt
from impl import Config, Plan
from model.store import Store

TARGET = Target(0.5)
ALONE_SECONDS = 2.0
SUPPLY = 2_000  # jobs the worker plans whenever it finds none


def _work(store: Store, stop: object, log: str) -> None:
    ready, stop = stop  # type: ignore[misc]
    # [finished at, 1 if the worker planned its supply just before this job else 0]: the
    # pause of a plan_many is the worker's own, not the prune's.
    stamps: list[tuple[float, int]] = []
    supplied = 0
    planned = 0
    try:
        while not stop.is_set():  # type: ignore[attr-defined]
            held = store.lease_next("bench-worker")
            if held is None:
                base = supplied
                store.plan_many(
                    ledger.KIND, [Plan({"w": os.getpid(), "i": base + i}) for i in range(SUPPLY)]
                )
                supplied += SUPPLY
                planned = 1
                continue
            store.run_effect(held, "op", ledger.noop)
            store.advance(held, "DONE")
            stamps.append((time.time(), planned))
            planned = 0
            if len(stamps) == 50:
                ready.set()  # type: ignore[attr-defined]
    finally:
        store.close()
    Path(log).write_text(json.dumps(stamps))


def _sqlite_worker(path: str, stop: object, log: str) -> None:
    _work(ledger.open_sqlite(Path(path)), stop, log)


def _pg_worker(url: str, schema: str, stop: object, log: str) -> None:
    from impl.postgres.store import PostgresStore

    _work(PostgresStore(url, config=Config(postgres_schema=schema)), stop, log)


def _rate(stamps: list[list[float]], start: float, end: float) -> float:
    inside = [s for s, _ in stamps if start <= s <= end]
    return len(inside) / max(end - start, 1e-9)


def _longest_pause(stamps: list[list[float]], start: float, end: float) -> float:
    """The longest time between two jobs finishing inside [start, end] (from ``start`` to
    the first, and from the last to ``end``), leaving out the worker's own planning."""
    window = [(start, 0.0), *((s, p) for s, p in stamps if start <= s <= end), (end, 0.0)]
    return max((b - a for (a, _), (b, p) in itertools.pairwise(window) if not p), default=0.0)


def _measure(
    store: Store, start_worker: Callable[[object, str], mp.process.BaseProcess], logs: Path
) -> tuple[float, float, float, float]:
    """(alone jobs/s, during jobs/s, prune jobs/s, longest pause in s) of one run.

    One worker process runs throughout: alone for :data:`ALONE_SECONDS`, beside the
    prune, then alone again for as long; its rate alone is over both windows, so a load
    that changes during the run (other sessions share the machine) weighs on both sides.
    """
    ctx = mp.get_context("fork")
    ready, stop = ctx.Event(), ctx.Event()
    log = str(logs / "worker.json")
    proc = start_worker((ready, stop), log)
    ready.wait(60)
    before = (time.time(), time.time() + ALONE_SECONDS)
    time.sleep(ALONE_SECONDS)
    start = time.time()
    report = store.prune(finished_before=store.now())
    end = time.time()
    time.sleep(ALONE_SECONDS)
    after = (end, time.time())
    stop.set()
    proc.join()
    stamps = json.loads(Path(log).read_text())
    windows = (before, after)
    alone_jobs = sum(1 for s, _ in stamps for a, b in windows if a <= s <= b)
    alone = alone_jobs / sum(b - a for a, b in windows)
    pause = _longest_pause(stamps, start, end)
    return alone, _rate(stamps, start, end), report.jobs / (end - start), pause


def _sqlite_run(settings: Settings, size: int) -> tuple[float, float, float, float]:
    path = settings.scratch(f"prune-{size}") / "ledger.sqlite"
    lease.build(path, size)
    store = ledger.open_sqlite(path)
    ctx = mp.get_context("fork")

    def start_worker(stop: object, log: str) -> mp.process.BaseProcess:
        proc = ctx.Process(target=_sqlite_worker, args=(str(path), stop, log))
        proc.start()
        return proc

    try:
        return _measure(store, start_worker, path.parent)
    finally:
        store.close()


def _pg_run(settings: Settings, size: int) -> tuple[float, float, float, float]:
    import psycopg
    from psycopg import sql

    from impl.postgres.store import PostgresStore

    url = settings.pg_url
    assert url
    schema = f"bench_prune_{uuid.uuid4().hex[:8]}"
    config = Config(postgres_schema=schema)
    store = PostgresStore(url, config=config)
    try:
        store.register(ledger.WORKFLOW)
        _fill_postgres(url, schema, size)
        logs = settings.scratch(f"prune-pg-{size}")
        ctx = mp.get_context("fork")

        def start_worker(stop: object, log: str) -> mp.process.BaseProcess:
            proc = ctx.Process(target=_pg_worker, args=(url, schema, stop, log))
            proc.start()
            return proc

        return _measure(store, start_worker, logs)
    finally:
        store.close()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def _fill_postgres(url: str, schema: str, size: int) -> None:
    """``size`` finished jobs, inserted by the server itself (the guard trigger off)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        conn.execute("ALTER TABLE jobs DISABLE TRIGGER jobs_guard")
        conn.execute(
            """
            INSERT INTO jobs (job_id, kind, identity, payload, state, active, attempts,
                max_attempts, priority, run_at, token, created_at, updated_at)
            SELECT md5(%(tag)s || i) || md5(i || %(tag)s), %(kind)s,
                   '{"n":' || i || '}', 'null', 'DONE', false, 1, 5, 0, 0, 1, 0, 0
            FROM generate_series(1, %(size)s) AS i
            """,
            {"tag": schema, "kind": ledger.KIND, "size": size},
        )
        conn.execute("ALTER TABLE jobs ENABLE TRIGGER jobs_guard")
        conn.execute("VACUUM ANALYZE jobs")


def _results(
    backend: str, size: int, runs: list[tuple[float, float, float, float]]
) -> list[Result]:
    alone = tuple(r[0] for r in runs)
    during = tuple(r[1] for r in runs)
    rate = [r[2] for r in runs]
    pause = [r[3] * 1000 for r in runs]
    ratios = tuple(d / a for a, d in zip(alone, during, strict=True))
    return [
        Result(
            bench="prune",
            case=f"worker beside a prune of {fmt(size)} finished jobs ({backend})",
            subject=Series("worker during prune", "jobs/s", during),
            baseline=Series("worker alone", "jobs/s", alone),
            ratio=Series("ratio", "x", ratios),
            target=TARGET,
            note=(
                f"{backend}: prune removed {statistics.median(rate):,.0f} jobs/s while the "
                f"worker ran; the worker's longest pause between two jobs during it: "
                f"{statistics.median(pause):.0f} ms (median of runs)"
            ),
        ),
        Result(
            bench="prune",
            case=f"prune rate while a worker runs ({backend}, default batch)",
            subject=Series("prune", "jobs/s", tuple(rate)),
            baseline=None,
            ratio=None,
        ),
    ]


def run(settings: Settings) -> list[Result]:
    size = 30_000 if settings.quick else 300_000
    runs = min(settings.runs, 3)
    backends: list[tuple[str, Callable[[Settings, int], tuple[float, float, float, float]]]] = [
        ("SQLite", _sqlite_run)
    ]
    if settings.pg_url:
        backends.append(("PostgreSQL", _pg_run))
    results: list[Result] = []
    for name, one_run in backends:
        done = []
        for _ in range(runs):
            a, d, r, p = one_run(settings, size)
            done.append((a, d, r, p))
            print(
                f"  {name}: worker alone {a:,.0f} jobs/s, during the prune {d:,.0f} jobs/s "
                f"({d / a:.2f}x); prune {r:,.0f} jobs/s, longest pause {p * 1000:.0f} ms"
            )
        results += _results(name, size, done)
    return results
