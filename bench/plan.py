"""Benchmark 2, plan_many: one transaction of N new jobs against a raw ``executemany``.

Subject: ``store.plan_many(kind, identities)`` on a fresh SQLite file (keys computed,
payloads checked, history written: everything the call does). Baseline: one
``executemany`` INSERT of the same rows (same job ids, same identity text) into a table
with a unique key, in one transaction, the keys computed beforehand.
"""

from __future__ import annotations

import impl
from bench import ledger, rawsqlite, sqltrace
from bench.harness import Result, Settings, Target, compare, profile, stopwatch
from model.key import canon

TARGET = Target(0.5)


def _size(settings: Settings) -> int:
    return 2000 if settings.quick else 10000


def _api_run(settings: Settings, n: int) -> float:
    path = settings.scratch("plan-api") / "ledger.sqlite"
    items = ledger.identities(n)
    with ledger.open_sqlite(path) as store, stopwatch() as t:
        ids = store.plan_many(ledger.KIND, items)
    if len(set(ids)) != n:
        raise RuntimeError(f"plan_many returned {len(set(ids))} distinct ids for {n} items")
    return n / t[0]


def _raw_run(settings: Settings, n: int) -> float:
    path = settings.scratch("plan-raw") / "raw.sqlite"
    rows = [
        (impl.job_key(ledger.KIND, ident), ledger.KIND, canon(ident).decode(), "null")
        for ident in ledger.identities(n)
    ]
    conn = rawsqlite.connect(path, "NORMAL")
    try:
        with stopwatch() as t:
            rawsqlite.insert(conn, rows)
    finally:
        conn.close()
    return n / t[0]


def run(settings: Settings) -> list[Result]:
    n = _size(settings)
    result = compare(
        settings.runs,
        bench="plan_many",
        case=f"{n} new jobs, one call",
        unit="rows/s",
        subject=("plan_many", lambda _i: _api_run(settings, n)),
        baseline=("raw executemany", lambda _i: _raw_run(settings, n)),
        target=TARGET,
    )
    if settings.profile:
        path = settings.scratch("plan-prof") / "ledger.sqlite"
        items = ledger.identities(n)
        with ledger.open_sqlite(path) as store:
            print(profile(lambda: store.plan_many(ledger.KIND, items), title=f"plan_many {n}"))
        print(
            sqltrace.traced(
                lambda: ledger.open_sqlite(settings.scratch("plan-sql") / "ledger.sqlite"),
                lambda store: store.plan_many(ledger.KIND, items),
                title=f"plan_many {n}",
            )
        )
    return [result]
