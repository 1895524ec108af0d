"""Benchmark 4, processes: 1, 2 and 4 worker processes draining one ledger.

SQLite: N jobs in one file, drained by P processes each running the API lifecycle
(:func:`bench.ledger.lifecycle`); the raw-SQL lifecycle on one file is run the same way
for reference. PostgreSQL: the same with :class:`impl.postgres.store.PostgresStore`
against a raw ``FOR UPDATE SKIP LOCKED`` claim cycle (claim, record, finish: three
durable commits per job) in the same run. Throughput is total jobs over the wall time
from the moment every process is connected and released at once to the last one
finishing (start-up is not timed). Every busy error that reaches the caller is counted:
the SQLite target allows none.

Each run drains enough jobs to last about half a second or more (3,000 on SQLite, 600
through the PostgreSQL API): shorter runs measured mostly start-up transients, and their
ratios spread from 0.6x to 1.4x between runs.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sqlite3
import time
import uuid
from collections.abc import Callable
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import impl
from bench import ledger, rawsqlite
from bench.harness import Result, Series, Settings, Target

PROCESSES = (1, 2, 4)
SQLITE_TARGET = Target(0.9)
PG_TARGET = Target(0.9)
CHILD_TIMEOUT = 300.0


# -- children (run in spawned processes) --------------------------------------------------


Opener = Callable[[str, str], Callable[[str], tuple[int, int, int]]]
"""Given (mode, target), open what one child runs: a function of its worker name that
drains jobs and returns (jobs done, busy errors, other errors)."""


def _child(  # noqa: PLR0917 - multiprocessing passes a child's arguments by position
    mode: str,
    target: str,
    name: str,
    barrier: Barrier,
    out: mp.Queue[tuple[Any, ...]],
    opener: Opener,
) -> None:
    try:
        work = opener(mode, target)
    except BaseException as exc:  # reported, never hung on: the barrier is aborted
        barrier.abort()
        out.put(("error", f"{name}: {type(exc).__name__}: {exc}"))
        return
    try:
        barrier.wait()
        start = time.monotonic()
        done, busy, other = work(name)
        out.put(("ok", done, busy, other, start, time.monotonic()))
    except BaseException as exc:
        out.put(("error", f"{name}: {type(exc).__name__}: {exc}"))


def _open(mode: str, target: str) -> Callable[[str], tuple[int, int, int]]:
    if mode == "sqlite-api":
        store = ledger.open_sqlite(Path(target))
        return lambda name: ledger.lifecycle(store, name)
    if mode == "sqlite-raw":
        conn = rawsqlite.connect(Path(target), "NORMAL")
        return lambda name: _raw_sqlite(conn, name)
    url, schema = target.split("#", 1)
    if mode == "pg-api":
        from impl.postgres.store import PostgresStore

        pg_store = PostgresStore(url, config=impl.Config(postgres_schema=schema))
        return lambda name: ledger.lifecycle(pg_store, name)
    from bench import rawpg

    pg_conn = rawpg.connect(url, schema)
    return lambda name: rawpg.lifecycle(pg_conn, name)


def _raw_sqlite(conn: sqlite3.Connection, name: str) -> tuple[int, int, int]:
    done, busy = rawsqlite.lifecycle(conn, name)
    return done, busy, 0


# -- the parent ---------------------------------------------------------------------------


def drain(
    mode: str, target: str, processes: int, jobs: int, *, opener: Opener = _open
) -> tuple[float, int, int]:
    """Run ``processes`` children over ``target``; return (jobs/s, busy errors, other)."""
    # fork starts a child in milliseconds, and the parent holds no open connection or
    # thread at this point (every store used to plan is closed); spawn elsewhere.
    ctx: Any = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    barrier = ctx.Barrier(processes + 1)
    out: mp.Queue[tuple[Any, ...]] = ctx.Queue()
    children = [
        ctx.Process(
            target=_child,
            args=(mode, target, f"bench-{i}", barrier, out, opener),
            daemon=True,
        )
        for i in range(processes)
    ]
    for child in children:
        child.start()
    try:
        with contextlib.suppress(Exception):
            barrier.wait(timeout=60)
        reports = [out.get(timeout=CHILD_TIMEOUT) for _ in children]
    finally:
        for child in children:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
                child.join()
    errors = [r[1] for r in reports if r[0] == "error"]
    if errors:
        raise RuntimeError(f"{mode} with {processes} processes: {errors}")
    done = sum(r[1] for r in reports)
    busy = sum(r[2] for r in reports)
    other = sum(r[3] for r in reports)
    if done != jobs:
        raise RuntimeError(f"{mode} with {processes} processes: {done} of {jobs} jobs done")
    elapsed = max(r[5] for r in reports) - min(r[4] for r in reports)
    return jobs / elapsed, busy, other


def sqlite_target(settings: Settings, mode: str, jobs: int) -> str:
    path = settings.scratch(f"procs-{mode}") / "ledger.sqlite"
    idents = ledger.identities(jobs)
    if mode == "sqlite-api":
        with ledger.open_sqlite(path) as store:
            store.plan_many(ledger.KIND, idents)
    else:
        conn = rawsqlite.connect(path, "NORMAL")
        try:
            rawsqlite.insert(
                conn, [(impl.job_key(ledger.KIND, i), ledger.KIND, str(i), "null") for i in idents]
            )
        finally:
            conn.close()
    return str(path)


def pg_target(url: str, mode: str, jobs: int) -> str:
    schema = f"bench_{mode.replace('-', '_')}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    idents = ledger.identities(jobs)
    if mode == "pg-api":
        from impl.postgres.store import PostgresStore

        with PostgresStore(url, config=impl.Config(postgres_schema=schema)) as store:
            store.register(ledger.WORKFLOW)
            store.plan_many(ledger.KIND, idents)
    else:
        from bench import rawpg

        rawpg.create(url, schema, [(impl.job_key(ledger.KIND, i), str(i)) for i in idents])
    return f"{url}#{schema}"


def pg_drop(target: str) -> None:
    from bench import rawpg

    url, schema = target.split("#", 1)
    rawpg.drop(url, schema)


def _sweep(
    settings: Settings, mode: str, jobs: int, make: Callable[[], str], drop: Callable[[str], None]
) -> tuple[dict[int, list[float]], int, int]:
    """Throughput per process count over the runs; also busy and other error totals."""
    # Every run, not at most 3 as before: with 3 the median of one invocation moved by
    # 0.05x or more from one invocation to the next.
    runs = 2 if settings.quick else settings.runs
    rates: dict[int, list[float]] = {p: [] for p in PROCESSES}
    busy = other = 0
    for run_index in range(runs):
        order = PROCESSES if run_index % 2 == 0 else PROCESSES[::-1]
        for processes in order:
            target = make()
            try:
                rate, b, o = drain(mode, target, processes, jobs)
            finally:
                drop(target)
            rates[processes].append(rate)
            busy += b
            other += o
    return rates, busy, other


def _scaling(rates: dict[int, list[float]], p: int) -> list[float]:
    return [b / a for a, b in zip(rates[1], rates[p], strict=True)]


def run_sqlite(settings: Settings) -> list[Result]:
    jobs = 400 if settings.quick else 3000
    results = []
    api, busy, other = _sweep(
        settings, "sqlite-api", jobs, lambda: sqlite_target(settings, "sqlite-api", jobs), _noop
    )
    raw, raw_busy, _ = _sweep(
        settings, "sqlite-raw", jobs, lambda: sqlite_target(settings, "sqlite-raw", jobs), _noop
    )
    for p in PROCESSES[1:]:
        results.append(
            Result(
                bench="processes",
                case=f"SQLite API, {p} vs 1 process, {jobs} jobs",
                subject=Series(f"{p} processes", "jobs/s", tuple(api[p])),
                baseline=Series("1 process", "jobs/s", tuple(api[1])),
                ratio=Series("ratio", "x", tuple(_scaling(api, p))),
                target=SQLITE_TARGET if p == 4 else None,
                note=f"busy errors reaching the caller: {busy}, other errors: {other}",
                ok=busy == 0 and other == 0,
            )
        )
    results.append(
        Result(
            bench="processes",
            case=f"SQLite raw SQL, 4 vs 1 process (reference), {jobs} jobs",
            subject=Series("4 processes", "jobs/s", tuple(raw[4])),
            baseline=Series("1 process", "jobs/s", tuple(raw[1])),
            ratio=Series("ratio", "x", tuple(_scaling(raw, 4))),
            note=f"raw busy errors (retried): {raw_busy}",
        )
    )
    return results


def run_postgres(settings: Settings) -> list[Result]:
    url = settings.pg_url
    if url is None:
        print("  skipped: no PostgreSQL URL (--pg URL)")
        return []
    try:
        import psycopg

        psycopg.connect(url, connect_timeout=3).close()
    except Exception as exc:
        print(f"  skipped: PostgreSQL at {url} is not reachable: {exc}")
        return []
    api_jobs = 100 if settings.quick else 600
    raw_jobs = 300 if settings.quick else 1800
    api, busy, other = _sweep(
        settings, "pg-api", api_jobs, lambda: pg_target(url, "pg-api", api_jobs), pg_drop
    )
    raw, _, _ = _sweep(
        settings, "pg-raw", raw_jobs, lambda: pg_target(url, "pg-raw", raw_jobs), pg_drop
    )
    results = []
    for p in PROCESSES:
        results.append(
            Result(
                bench="processes",
                case=f"PostgreSQL, {p} process{'es' if p > 1 else ''} (API {api_jobs} jobs"
                f", raw {raw_jobs})",
                subject=Series("API", "jobs/s", tuple(api[p])),
                baseline=Series("raw SKIP LOCKED", "jobs/s", tuple(raw[p])),
                ratio=Series(
                    "ratio", "x", tuple(a / r for a, r in zip(api[p], raw[p], strict=True))
                ),
            )
        )
    api4 = _scaling(api, 4)
    raw4 = _scaling(raw, 4)
    results.append(
        Result(
            bench="processes",
            case="PostgreSQL scaling 1 -> 4 processes, API vs raw",
            subject=Series("API 4/1", "x", tuple(api4)),
            baseline=Series("raw 4/1", "x", tuple(raw4)),
            ratio=Series("ratio", "x", tuple(a / r for a, r in zip(api4, raw4, strict=True))),
            target=PG_TARGET,
            note=f"errors reaching the caller: busy {busy}, other {other}",
            ok=busy == 0 and other == 0,
        )
    )
    return results


def _noop(_target: str) -> None:
    """SQLite files stay in the run's temp directory, removed at the end."""
