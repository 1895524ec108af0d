"""Benchmark 3, lease_next latency against the size of the jobs table.

Tables of 10k, 100k and 1M jobs, 99% of them finished (every hundredth job still
planned), are built quickly with raw inserts in the SQLite backend's own schema (the
schema is created by opening a store first, so it is exactly the backend's). Each is
built once per bench run under the run's temp directory. A measurement is one
``lease_next`` call; the lease is then released, untimed, so the table stays in the
same state from call to call. The baseline is the latency at 10k jobs in the same run.
"""

from __future__ import annotations

import hashlib
import sqlite3
import statistics
import time
from pathlib import Path

from bench import ledger
from bench.harness import Result, Series, Settings, Target, fmt, profile
from impl import job_key

TARGET = Target(1.5, at_most=True)
ACTIVE_EVERY = 100  # one job in a hundred is still to do: 99% finished
CALLS = 300
WARMUP = 30
CHUNK = 50_000

_INSERT = """
INSERT INTO jobs (
    job_id, seq, kind, identity, payload, state, terminal, attempts, max_attempts,
    priority, run_at, token, created_at, updated_at
) VALUES (?, ?, ?, ?, 'null', ?, ?, ?, 5, 0, ?, ?, ?, ?)
"""


def _key(i: int) -> tuple[str, str]:
    # The canonical encoding of ledger.identities(), written out (checked in build()).
    identity = f'{{"batch":"bench","n":{i}}}'
    text = f'{{"id":{identity},"kind":"{ledger.KIND}","v":1}}'
    return hashlib.sha256(text.encode()).hexdigest(), identity


# The finished 99% are filler generated inside SQLite (a Python loop over a million rows
# took minutes on a loaded machine): random 64-hex ids, as real keys are. The jobs that
# lease_next can return are real: their ids are the job keys of their identities.
_FILL = """
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < :size)
INSERT INTO jobs (
    job_id, seq, kind, identity, payload, state, terminal, attempts, max_attempts,
    priority, run_at, token, created_at, updated_at
)
SELECT lower(hex(randomblob(32))), i + 1, :kind, '{"batch":"bench","n":' || i || '}', 'null',
       'DONE', 1, 1, 5, 0, :now + i * 1e-4, 1, :now, :now
FROM n WHERE i % :every != 0
"""


# The same filler with ids in planned order (zero-padded numbers, still 64 hex digits):
# the unique index of ids is then filled at its end, not at random places, which made a
# 10M build take longer than a session here. For benchmarks that never look a job up by
# id (status).
_FILL_ORDERED = _FILL.replace("lower(hex(randomblob(32)))", "printf('%064d', i)")


def build(path: Path, size: int, *, ordered_ids: bool = False) -> float:
    """Create a ledger of ``size`` jobs at ``path``, 99% finished; return seconds taken.
    ``ordered_ids`` gives the finished jobs ids in planned order (see ``_FILL_ORDERED``)."""
    assert _key(7)[0] == job_key(ledger.KIND, {"n": 7, "batch": "bench"})
    started = time.perf_counter()
    ledger.open_sqlite(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -262144")
        now = time.time() - 3600.0
        # Secondary indexes are dropped and rebuilt once: a sort instead of N inserts.
        indexes = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'jobs'"
            " AND sql IS NOT NULL"
        ).fetchall()
        conn.execute("BEGIN IMMEDIATE")
        for name, _sql in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        conn.execute(
            _FILL_ORDERED if ordered_ids else _FILL,
            {"size": size, "kind": ledger.KIND, "now": now, "every": ACTIVE_EVERY},
        )
        active = []
        for i in range(0, size, ACTIVE_EVERY):
            key, identity = _key(i)
            active.append(
                (key, i + 1, ledger.KIND, identity, "PLANNED", 0, 0, now + i * 1e-4, 0, now, now)
            )
        conn.executemany(_INSERT, active)
        for _name, sql in indexes:
            conn.execute(sql)
        conn.execute("COMMIT")
        conn.execute("ANALYZE")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return time.perf_counter() - started


def _measure(store: ledger.SqliteStore, calls: int) -> float:
    """Median seconds of one ``lease_next`` over ``calls`` calls."""
    samples = []
    for i in range(WARMUP + calls):
        start = time.perf_counter()
        lease = store.lease_next("bench")
        elapsed = time.perf_counter() - start
        if lease is None:
            raise RuntimeError("lease_next found nothing eligible in the latency table")
        store.release(lease)
        if i >= WARMUP:
            samples.append(elapsed)
    return statistics.median(samples)


def run(settings: Settings) -> list[Result]:
    sizes = [10_000, 100_000] if settings.quick else [10_000, 100_000, 1_000_000]
    calls = 100 if settings.quick else CALLS
    stores = {}
    for size in sizes:
        path = settings.scratch(f"lease-{size}") / "ledger.sqlite"
        took = build(path, size)
        print(f"  built {size:,} jobs in {took:.1f} s ({path.stat().st_size / 1e6:.0f} MB)")
        stores[size] = ledger.open_sqlite(path)
    try:
        latency: dict[int, list[float]] = {size: [] for size in sizes}
        for run_index in range(settings.runs):
            order = sizes if run_index % 2 == 0 else sizes[::-1]
            for size in order:
                latency[size].append(_measure(stores[size], calls) * 1e6)
        if settings.profile:
            big = sizes[-1]
            print(profile(lambda: _measure(stores[big], calls), title=f"lease_next at {big:,}"))
    finally:
        for store in stores.values():
            store.close()
    base = sizes[0]
    results = []
    for size in sizes[1:]:
        ratios = [b / a for a, b in zip(latency[base], latency[size], strict=True)]
        results.append(
            Result(
                bench="lease_next",
                case=f"{fmt(size)} jobs vs {fmt(base)}, 99% finished",
                subject=Series(f"at {size:,}", "us", tuple(latency[size]), higher=False),
                baseline=Series(f"at {base:,}", "us", tuple(latency[base]), higher=False),
                ratio=Series("ratio", "x", tuple(ratios), higher=False),
                target=TARGET if size == 1_000_000 else None,
            )
        )
    return results
