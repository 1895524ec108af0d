"""Benchmark: the cost per job at real concurrency (issue 15, targets 1 to 3).

I/O-bound work: each job runs one recorded effect whose ``fn`` sleeps 20 ms (a round trip
to some service), then advances to its terminal state: ``ctx.effect("io", io,
then="DONE")``, the way the API says it, so the result and the advance are one commit.

- **Processes.** N processes, each running ``impl.Worker(concurrency=1)`` until idle,
  drain one ledger. The floor is the same work written as bare SQL in the same harness,
  at the same N, in the same run: claim; record the effect's start; record its result and
  finish the job. Three transactions with the same durability (WAL, ``synchronous=NORMAL``
  on SQLite; ``synchronous_commit=on`` on PostgreSQL), and the same 20 ms sleep between
  the start and the result. Every process is started, connected and waiting on a barrier
  before the clock starts. Errors that reach the caller are counted: the Worker's own
  warnings and errors (a busy ledger, a lost lease) and, on the floor, busy errors.
- **Threads.** One process, ``Worker(concurrency=64)``: efficiency against the ideal
  (jobs x 20 ms / 64), on SQLite and on PostgreSQL; on SQLite also with grouped commits
  (``sqlite_group_window``, :mod:`impl.sqlite.group`) and with every handler thread
  making its own ledger calls (``ledger_threads=0``, as before the default became the
  worker's ledger thread, :mod:`impl.ledgerthread`), run by run alternating with the
  default; on PostgreSQL the default (handler threads make their calls) against ledger
  threads (8).

Targets: SQLite >= 0.8x the floor at N = 8, 32 and 64 with no error reaching the caller and
no fall in throughput from 16 to 64 processes; PostgreSQL >= 0.9x at N = 8 and 64; threads
>= 0.85 of the ideal on SQLite.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import impl
from bench import ledger, procs
from bench.harness import Result, Series, Settings, Target, stopwatch

SLEEP = 0.020
SQLITE_PROCESSES = (8, 16, 32, 64)
SQLITE_TARGETED = (8, 32, 64)
PG_PROCESSES = (8, 64)
THREADS = 64
SQLITE_TARGET = Target(0.8)
PG_TARGET = Target(0.9)
THREADS_TARGET = Target(0.85)
PG_LEDGER_THREADS = 8
"""``Worker(ledger_threads=...)`` of the PostgreSQL threads case: its pool's size (one
thread would make the calls wait on the server one after another)."""
GROUP_WINDOW = 0.001
"""``sqlite_group_window`` of the grouped threads case (1 ms measured best of 1, 5 and 20 ms
with 64 threads here)."""


def io(_ctx: impl.EffectContext) -> None:
    """The effect: 20 ms of waiting on the world."""
    time.sleep(SLEEP)


def handler(ctx: impl.JobContext) -> None:
    """One recorded I/O effect, and the terminal state with its result."""
    ctx.effect("io", io, then="DONE")


class _Complaints(logging.Handler):
    """Counts the Worker's warnings and errors: each is an error that reached it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def _worker_run(store: impl.Store, name: str) -> tuple[int, int, int]:
    complaints = _Complaints()
    logging.getLogger("jobledger").addHandler(complaints)
    worker = impl.Worker(store, {ledger.KIND: handler}, name=name, idle_poll=0.005)
    report = worker.run(until_idle=True)
    return report.finished, 0, complaints.count + report.failed + report.lost


# -- the floor: the same work in bare SQL --------------------------------------------------

_SQLITE_START = "INSERT INTO effects (op_key, job_id, result) VALUES (?, ?, 'started')"
_SQLITE_RESULT = "UPDATE effects SET result = 'null' WHERE op_key = ?"
_SQLITE_FINISH = (
    "UPDATE jobs SET state = 'DONE', done = 1, lease_worker = NULL, lease_expires_at = NULL "
    "WHERE job_id = ? AND token = ?"
)


def _sqlite_floor(conn: sqlite3.Connection, name: str) -> tuple[int, int, int]:
    done = busy = 0

    def tx(*statements: tuple[str, tuple[object, ...]]) -> tuple[object, ...] | None:
        nonlocal busy
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                row = None
                for sql, params in statements:
                    row = conn.execute(sql, params).fetchone()
                conn.execute("COMMIT")
                return row
            except sqlite3.OperationalError as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                busy += 1

    from bench import rawsqlite

    while True:
        now = time.time()
        job = tx((rawsqlite.CLAIM, (name, now + 30.0, now, now)))
        if job is None:
            return done, busy, 0
        job_id, token = job
        op = f"{job_id}:io"
        tx((_SQLITE_START, (op, job_id)))
        time.sleep(SLEEP)
        tx((_SQLITE_RESULT, (op,)), (_SQLITE_FINISH, (job_id, token)))
        done += 1


def _pg_floor(conn: Any, name: str) -> tuple[int, int, int]:
    from bench import rawpg

    done = 0
    while True:
        with conn.transaction():
            row = conn.execute(rawpg.CLAIM, (name,)).fetchone()
        if row is None:
            return done, 0, 0
        job_id, token = row
        op = f"{job_id}:io"
        with conn.transaction():
            conn.execute(
                "INSERT INTO effects (op_key, job_id, result) VALUES (%s, %s, 'started')",
                (op, job_id),
            )
        time.sleep(SLEEP)
        with conn.transaction():
            conn.execute("UPDATE effects SET result = 'null' WHERE op_key = %s", (op,))
            conn.execute(rawpg.FINISH, (job_id, token))
        done += 1


def opener(mode: str, target: str) -> Callable[[str], tuple[int, int, int]]:
    """What one child process runs (see :func:`bench.procs.drain`)."""
    if mode == "sqlite-api":
        store = ledger.open_sqlite(Path(target))
        return lambda name: _worker_run(store, name)
    if mode == "sqlite-raw":
        from bench import rawsqlite

        conn = rawsqlite.connect(Path(target), "NORMAL")
        return lambda name: _sqlite_floor(conn, name)
    url, schema = target.split("#", 1)
    if mode == "pg-api":
        from impl.postgres.store import PostgresStore

        pg_store = PostgresStore(url, config=impl.Config(postgres_schema=schema))
        return lambda name: _worker_run(pg_store, name)
    from bench import rawpg

    pg_conn = rawpg.connect(url, schema)
    return lambda name: _pg_floor(pg_conn, name)


# -- the parent ---------------------------------------------------------------------------


def _jobs(settings: Settings) -> int:
    return 600 if settings.quick else 2000


def _runs(settings: Settings) -> int:
    return 1 if settings.quick else min(settings.runs, 3)


def _sweep(
    settings: Settings,
    modes: tuple[str, str],
    counts: tuple[int, ...],
    make: Callable[[str], str],
    drop: Callable[[str], None],
) -> tuple[dict[str, dict[int, list[float]]], dict[str, int]]:
    jobs = _jobs(settings)
    rates: dict[str, dict[int, list[float]]] = {m: {n: [] for n in counts} for m in modes}
    errors = dict.fromkeys(modes, 0)
    for run_index in range(_runs(settings)):
        for n in counts:
            # Alternate which side goes first, run by run, as every paired benchmark does.
            order = modes if run_index % 2 == 0 else modes[::-1]
            for mode in order:
                target = make(mode)
                before = os.times()
                try:
                    rate, busy, other = procs.drain(mode, target, n, jobs, opener=opener)
                finally:
                    drop(target)
                after = os.times()
                # The children's CPU (they are joined by now), from fork to exit.
                spent = sum(after[2:4]) - sum(before[2:4])
                rates[mode][n].append(rate)
                CPU_MS[mode, n].append(spent / jobs * 1000)
                errors[mode] += busy + other
                print(
                    f"    {mode} x{n}: {rate:,.0f} jobs/s, errors {busy + other}, "
                    f"CPU per job {spent / jobs * 1000:.2f} ms"
                )
    return rates, errors


CPU_MS: defaultdict[tuple[str, int], list[float]] = defaultdict(list)
"""Milliseconds of CPU per job of every sweep run, by (mode, processes): the children's
user and system time from fork to exit (start-up included) over the jobs drained."""


def _ratio_result(
    engine: str,
    n: int,
    *,
    rates: dict[str, dict[int, list[float]]],
    modes: tuple[str, str],
    target: Target | None,
    errors: dict[str, int],
    jobs: int,
) -> Result:
    api, raw = rates[modes[0]][n], rates[modes[1]][n]
    return Result(
        bench="fleet",
        case=f"{engine}, {n} processes x Worker(concurrency=1), {jobs} jobs of 20 ms I/O",
        subject=Series("jobledger", "jobs/s", tuple(api)),
        baseline=Series("bare SQL floor", "jobs/s", tuple(raw)),
        ratio=Series("ratio", "x", tuple(a / r for a, r in zip(api, raw, strict=True))),
        target=target,
        note=(
            f"errors reaching the caller: jobledger {errors[modes[0]]}, floor {errors[modes[1]]}; "
            f"CPU per job (median): jobledger {median(CPU_MS[modes[0], n]):.2f} ms, "
            f"floor {median(CPU_MS[modes[1], n]):.2f} ms"
        ),
        ok=errors[modes[0]] == 0,
    )


def run_sqlite(settings: Settings) -> list[Result]:
    """Targets 1 and 3 on SQLite."""
    jobs = _jobs(settings)
    modes = ("sqlite-api", "sqlite-raw")
    rates, errors = _sweep(
        settings,
        modes,
        SQLITE_PROCESSES,
        lambda mode: procs.sqlite_target(settings, mode, jobs),
        lambda _t: None,
    )
    results = [
        _ratio_result(
            "SQLite",
            n,
            rates=rates,
            modes=modes,
            target=SQLITE_TARGET if n in SQLITE_TARGETED else None,
            errors=errors,
            jobs=jobs,
        )
        for n in SQLITE_PROCESSES
    ]
    api = rates["sqlite-api"]
    falls = [b / a for a, b in zip(api[16], api[64], strict=True)]
    results.append(
        Result(
            bench="fleet",
            case="SQLite, jobledger throughput at 64 processes against 16 (must not fall)",
            subject=Series("64 processes", "jobs/s", tuple(api[64])),
            baseline=Series("16 processes", "jobs/s", tuple(api[16])),
            ratio=Series("ratio", "x", tuple(falls)),
            target=Target(1.0),
        )
    )
    plain, grouped, own_calls = _threads_paired(settings, jobs)
    results += [plain, grouped, own_calls]
    results.append(
        Result(
            bench="fleet",
            case=(
                "SQLite, Worker(concurrency=64, ledger_threads=0): grouped commits against "
                "ungrouped, same run"
            ),
            subject=grouped.subject,
            baseline=own_calls.subject,
            ratio=Series(
                "ratio",
                "x",
                tuple(
                    g / p
                    for g, p in zip(grouped.subject.values, own_calls.subject.values, strict=True)
                ),
            ),
        )
    )
    results.append(
        _against("SQLite", plain, own_calls, "default (ledger thread) / ledger_threads=0")
    )
    return results


def _against(engine: str, subject: Result, baseline: Result, what: str) -> Result:
    return Result(
        bench="fleet",
        case=f"{engine}, Worker(concurrency={THREADS}): {what}, same run",
        subject=subject.subject,
        baseline=baseline.subject,
        ratio=Series(
            "ratio",
            "x",
            tuple(
                t / p for t, p in zip(subject.subject.values, baseline.subject.values, strict=True)
            ),
        ),
    )


def _threads_paired(settings: Settings, jobs: int) -> tuple[Result, Result, Result]:
    """The SQLite threads case: the default worker (its ledger thread), grouped commits,
    and every handler thread making its own calls, alternating run by run."""
    # (sqlite_group_window, ledger_threads)
    variants: tuple[tuple[float, int | None], ...] = ((0.0, None), (GROUP_WINDOW, 0), (0.0, 0))
    found: dict[tuple[float, int | None], list[Result]] = {v: [] for v in variants}
    for run_index in range(_runs(settings)):
        for window, ledger_threads in variants if run_index % 2 == 0 else variants[::-1]:
            engine = "SQLite" if window == 0 else f"SQLite, sqlite_group_window={window:g}"
            found[window, ledger_threads].append(
                _threads(
                    engine,
                    settings,
                    lambda w=window: _sqlite_store(settings, jobs, group_window=w),
                    jobs,
                    runs=1,
                    ledger_threads=ledger_threads,
                )
            )
    plain, grouped, own_calls = (_merged(found[v]) for v in variants)
    return plain, grouped, own_calls


def _merged(results: list[Result]) -> Result:
    first = results[0]
    assert first.baseline is not None
    assert first.ratio is not None
    return Result(
        bench=first.bench,
        case=first.case,
        subject=Series(
            first.subject.label,
            first.subject.unit,
            tuple(v for r in results for v in r.subject.values),
        ),
        baseline=Series(
            first.baseline.label,
            first.baseline.unit,
            tuple(v for r in results if r.baseline is not None for v in r.baseline.values),
        ),
        ratio=Series(
            first.ratio.label,
            first.ratio.unit,
            tuple(v for r in results if r.ratio is not None for v in r.ratio.values),
        ),
        target=first.target,
    )


def run_postgres(settings: Settings) -> list[Result]:
    """Targets 2 and 3 on PostgreSQL."""
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
    jobs = _jobs(settings)
    modes = ("pg-api", "pg-raw")
    rates, errors = _sweep(
        settings,
        modes,
        PG_PROCESSES,
        lambda mode: procs.pg_target(url, mode, jobs),
        procs.pg_drop,
    )
    results = [
        _ratio_result(
            "PostgreSQL", n, rates=rates, modes=modes, target=PG_TARGET, errors=errors, jobs=jobs
        )
        for n in PG_PROCESSES
    ]

    def fresh() -> impl.Store:
        target = procs.pg_target(url, "pg-api", jobs)
        _url, schema = target.split("#", 1)
        from impl.postgres.store import PostgresStore

        store = PostgresStore(url, config=impl.Config(postgres_schema=schema))
        store.register(ledger.WORKFLOW)
        return _Dropping(store, target)

    pair: tuple[int | None, int | None] = (None, PG_LEDGER_THREADS)
    found: dict[int | None, list[Result]] = {v: [] for v in pair}
    for run_index in range(_runs(settings)):
        for threads in pair if run_index % 2 == 0 else pair[::-1]:
            found[threads].append(
                _threads("PostgreSQL", settings, fresh, jobs, runs=1, ledger_threads=threads)
            )
    plain, on_thread = _merged(found[None]), _merged(found[PG_LEDGER_THREADS])
    results += [
        plain,
        on_thread,
        _against("PostgreSQL", on_thread, plain, f"ledger_threads={PG_LEDGER_THREADS} / default"),
    ]
    return results


class _Dropping:
    """A store that drops its benchmark schema when closed."""

    def __init__(self, store: Any, target: str) -> None:
        self._store = store
        self._target = target

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def close(self) -> None:
        self._store.close()
        procs.pg_drop(self._target)


def _sqlite_store(settings: Settings, jobs: int, *, group_window: float = 0.0) -> impl.Store:
    path = procs.sqlite_target(settings, "sqlite-api", jobs)
    return ledger.open_sqlite(Path(path), group_window=group_window)


def _threads(
    engine: str,
    settings: Settings,
    fresh: Callable[[], impl.Store],
    jobs: int,
    *,
    runs: int | None = None,
    ledger_threads: int | None = None,
) -> Result:
    ideal = jobs * SLEEP / THREADS
    how = f"Worker(concurrency={THREADS}"
    how += ")" if ledger_threads is None else f", ledger_threads={ledger_threads})"
    efficiency: list[float] = []
    rates: list[float] = []
    for _ in range(_runs(settings) if runs is None else runs):
        store = fresh()
        try:
            worker = impl.Worker(
                store,
                {ledger.KIND: handler},
                concurrency=THREADS,
                idle_poll=0.005,
                ledger_threads=ledger_threads,
            )
            with stopwatch() as t:
                report = worker.run(until_idle=True)
        finally:
            store.close()
        if report.finished != jobs:
            raise RuntimeError(f"{engine} threads: {report.finished} of {jobs} jobs finished")
        efficiency.append(ideal / t[0])
        rates.append(jobs / t[0])
        print(f"    {engine} {how}: {jobs / t[0]:,.0f} jobs/s")
    return Result(
        bench="fleet",
        case=f"{engine}, one process, {how}, {jobs} jobs of 20 ms I/O",
        subject=Series("jobledger", "jobs/s", tuple(rates)),
        baseline=Series("ideal", "jobs/s", tuple(THREADS / SLEEP for _ in rates)),
        ratio=Series("efficiency", "x", tuple(efficiency)),
        target=THREADS_TARGET if engine.startswith("SQLite") else None,
    )
