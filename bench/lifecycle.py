"""Benchmark 1, lifecycle: plan N jobs, then lease, run one no-op effect, finish each.

Subject: :func:`bench.ledger.lifecycle` through the public API on a fresh SQLite file.
Baseline: :func:`bench.rawsqlite.lifecycle` (three raw transactions per job) on a fresh
file with the same ``synchronous``. Planning is not timed on either side. Measured for
``synchronous=NORMAL`` (the default, with the target) and ``FULL``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import impl
from bench import floor, ledger, rawsqlite, sqltrace
from bench.harness import Result, Settings, Target, compare, profile, stopwatch

TARGET = Target(0.5)


def _sizes(settings: Settings, synchronous: str) -> int:
    if synchronous == "NORMAL":
        return 200 if settings.quick else 1000
    # FULL pays an fsync per commit: fewer jobs keep the run short.
    return 30 if settings.quick else 150


def api_rate(path: Path, n: int, synchronous: str = "NORMAL") -> float:
    """Plan ``n`` jobs in a store on ``path`` (untimed), then return the lifecycle's jobs/s."""
    return _rate(path, n, synchronous, "lifecycle through the API", _api_lifecycle)


def _api_lifecycle(store: ledger.SqliteStore) -> int:
    done, busy, other = ledger.lifecycle(store)
    if busy or other:
        raise RuntimeError(f"lifecycle through the API: {busy + other} errors")
    return done


def _rate(
    path: Path, n: int, synchronous: str, what: str, drive: Callable[[ledger.SqliteStore], int]
) -> float:
    """Plan ``n`` jobs in a store on ``path`` (untimed); return the jobs/s ``drive`` runs."""
    with ledger.open_sqlite(path, synchronous) as store:
        store.plan_many(ledger.KIND, ledger.identities(n))
        with stopwatch() as t:
            done = drive(store)
    if done != n:
        raise RuntimeError(f"{what}: {done}/{n} done")
    return n / t[0]


def _api_run(settings: Settings, synchronous: str, n: int, _run: int = 0) -> float:
    return api_rate(settings.scratch("lifecycle-api") / "ledger.sqlite", n, synchronous)


def _floor_run(settings: Settings, n: int, _run: int = 0) -> float:
    path = settings.scratch("lifecycle-floor") / "ledger.sqlite"
    return _rate(path, n, "NORMAL", "floor lifecycle", floor.lifecycle)


def _raw_run(settings: Settings, synchronous: str, n: int, _run: int = 0) -> float:
    path = settings.scratch("lifecycle-raw") / "raw.sqlite"
    conn = rawsqlite.connect(path, synchronous)
    try:
        rawsqlite.insert(conn, _raw_rows(n))
        with stopwatch() as t:
            done, _busy = rawsqlite.lifecycle(conn)
    finally:
        conn.close()
    if done != n:
        raise RuntimeError(f"raw lifecycle: {done}/{n} done")
    return n / t[0]


def _raw_rows(n: int) -> list[tuple[str, str, str, str]]:
    return [
        (impl.job_key(ledger.KIND, ident), ledger.KIND, str(ident), "null")
        for ident in ledger.identities(n)
    ]


def run(settings: Settings) -> list[Result]:
    results = []
    for synchronous in ("NORMAL", "FULL"):
        n = _sizes(settings, synchronous)
        results.append(
            compare(
                settings.runs,
                bench="lifecycle",
                case=f"synchronous={synchronous}, {n} jobs",
                unit="jobs/s",
                subject=("API", functools.partial(_api_run, settings, synchronous, n)),
                baseline=(
                    "raw SQL, 3 tx/job",
                    functools.partial(_raw_run, settings, synchronous, n),
                ),
                target=TARGET if synchronous == "NORMAL" else None,
            )
        )
        if synchronous == "NORMAL":
            # Where the gap lies: the same statements with no API around them.
            results.append(
                compare(
                    settings.runs,
                    bench="lifecycle",
                    case=f"jobledger's own statements, no API (the design floor), {n} jobs",
                    unit="jobs/s",
                    subject=("statements only", functools.partial(_floor_run, settings, n)),
                    baseline=(
                        "raw SQL, 3 tx/job",
                        functools.partial(_raw_run, settings, synchronous, n),
                    ),
                )
            )
        if settings.profile and synchronous == "NORMAL":
            print(_profile(settings, n))
    return results


def _profile(settings: Settings, n: int) -> str:
    path = settings.scratch("lifecycle-prof") / "ledger.sqlite"
    with ledger.open_sqlite(path) as store:
        store.plan_many(ledger.KIND, ledger.identities(n))
        text = profile(lambda: ledger.lifecycle(store), title=f"lifecycle, {n} jobs (NORMAL)")

    def fresh() -> ledger.SqliteStore:
        store = ledger.open_sqlite(settings.scratch("lifecycle-sql") / "ledger.sqlite")
        store.plan_many(ledger.KIND, ledger.identities(n))
        return store

    return text + sqltrace.traced(fresh, ledger.lifecycle, title=f"lifecycle, {n} jobs")
