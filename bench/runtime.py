"""Benchmark 5, the Worker runtime's own overhead against calling the primitives by hand.

Subject: ``impl.Worker(store, {kind: handler}).run(until_idle=True)`` where the handler
runs one no-op effect and advances to the terminal state. Baseline: the same three calls
by hand (:func:`bench.ledger.lifecycle`) on an identical fresh file. The difference,
per job, is what the runtime costs (its context, the renewal thread, the bookkeeping).
"""

from __future__ import annotations

import attrs

import impl
from bench import ledger
from bench.harness import Result, Settings, compare, fmt, overhead, profile, stopwatch


def _size(settings: Settings) -> int:
    return 200 if settings.quick else 600


def _fresh(settings: Settings, n: int) -> ledger.SqliteStore:
    store = ledger.open_sqlite(settings.scratch("runtime") / "ledger.sqlite")
    store.plan_many(ledger.KIND, ledger.identities(n))
    return store


def _worker_run(settings: Settings, n: int) -> float:
    with _fresh(settings, n) as store:
        worker = impl.Worker(store, {ledger.KIND: ledger.handler}, idle_poll=0.001)
        with stopwatch() as t:
            report = worker.run(until_idle=True)
    if report.finished != n:
        raise RuntimeError(f"Worker finished {report.finished} of {n} jobs: {report}")
    return n / t[0]


def _hand_run(settings: Settings, n: int) -> float:
    with _fresh(settings, n) as store, stopwatch() as t:
        done, busy, other = ledger.lifecycle(store)
    if (done, busy, other) != (n, 0, 0):
        raise RuntimeError(f"by hand: {done}/{n} done, {busy + other} errors")
    return n / t[0]


def run(settings: Settings) -> list[Result]:
    n = _size(settings)
    result = compare(
        settings.runs,
        bench="worker",
        case=f"Worker.run vs primitives by hand, {n} jobs",
        unit="jobs/s",
        subject=("Worker", lambda _i: _worker_run(settings, n)),
        baseline=("by hand", lambda _i: _hand_run(settings, n)),
    )
    if settings.profile:
        with _fresh(settings, n) as store:
            worker = impl.Worker(store, {ledger.KIND: ledger.handler}, idle_poll=0.001)
            print(profile(lambda: worker.run(until_idle=True), title=f"Worker, {n} jobs"))
    note = f"runtime overhead about {fmt(overhead(result, 1e6))} us per job (median)"
    return [attrs.evolve(result, note=note)]
