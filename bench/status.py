"""``status`` (``store.stats()``) at 1M and 10M jobs, on SQLite and PostgreSQL.

The ledgers are built with bulk SQL in each backend's own schema (the schema comes from
opening a real store first), 99% of the jobs finished, as a ledger that ran for months
and was never pruned. The subject is ``store.stats()`` through the API; the baseline is
the count that ``stats`` ran before (SQLite: every job by kind and state, a read of the
whole table; PostgreSQL: the same ``GROUP BY`` over its ``(kind, state)`` index), in the
same run. On SQLite the first ``stats`` after the build also folds the whole table into
the counts behind the watermark (``impl/sqlite/rollup.py``): that one-time cost (as after
the schema upgrade of an existing ledger) is reported on its own line. Target: a
``stats`` under one second at ten million jobs.

Sizes: ``--quick`` 100k; default 1M and 10M (``JOBLEDGER_BENCH_STATUS_SIZES`` overrides,
e.g. ``1000000``); ``JOBLEDGER_BENCH_STATUS_BACKENDS=postgres`` measures one backend.
``JOBLEDGER_BENCH_STATUS_KEEP=DIR`` keeps the built ledgers for the next run (SQLite files
under ``DIR``, PostgreSQL schemas ``bench_status_keep_<size>``): a kept ledger is used as
it is (its watermark already folded, so the first ``stats`` then measures no fold); delete
the directory and ``DROP SCHEMA`` them by hand when done. PostgreSQL builds with the jobs
table's secondary indexes dropped and rebuilt once (a sort instead of ten million inserts
into each).
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import time
import uuid
from pathlib import Path

from bench import lease, ledger
from bench.harness import Result, Series, Settings, Target, fmt
from impl import Config

CALLS = 5
TARGET_SECONDS = 1.0
_FULL_COUNT_SQLITE = "SELECT kind, state, count(*) FROM jobs GROUP BY kind, state"


def _sizes(settings: Settings) -> list[int]:
    text = os.environ.get("JOBLEDGER_BENCH_STATUS_SIZES")
    if text:
        return [int(s) for s in text.split(",") if s.strip()]
    return [100_000] if settings.quick else [1_000_000, 10_000_000]


def _median_seconds(fn: object, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - start)
    return out


def _keep() -> Path | None:
    text = os.environ.get("JOBLEDGER_BENCH_STATUS_KEEP")
    return Path(text) if text else None


def _sqlite(settings: Settings, size: int) -> list[Result]:
    keep = _keep()
    if keep is not None and (keep / f"status-{size}.sqlite").exists():
        path = keep / f"status-{size}.sqlite"
        print(f"  sqlite: reusing {path} ({path.stat().st_size / 1e6:.0f} MB)")
    else:
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            # Built under another name and renamed once complete (its WAL checkpointed
            # and truncated by the build): an interrupted build is never reused.
            building = keep / f"status-{size}.building.sqlite"
            for leftover in keep.glob(building.name + "*"):
                leftover.unlink()
            took = lease.build(building, size, ordered_ids=True)
            path = keep / f"status-{size}.sqlite"
            building.replace(path)
            for leftover in keep.glob(building.name + "*"):
                leftover.unlink()
        else:
            path = settings.scratch(f"status-{size}") / "ledger.sqlite"
            took = lease.build(path, size, ordered_ids=True)
        print(f"  sqlite: built {size:,} jobs in {took:.1f} s ({path.stat().st_size / 1e6:.0f} MB)")
    store = ledger.open_sqlite(path)
    raw = sqlite3.connect(path)
    try:
        start = time.perf_counter()
        first = store.stats()
        fold = time.perf_counter() - start
        assert sum(first.by_state[ledger.KIND].values()) == size
        subject: list[float] = []
        baseline: list[float] = []
        for i in range(settings.runs):
            pair = [
                lambda: subject.extend(_median_seconds(store.stats, CALLS)),
                lambda: baseline.extend(
                    _median_seconds(lambda: raw.execute(_FULL_COUNT_SQLITE).fetchall(), 1)
                ),
            ]
            for step in pair if i % 2 == 0 else pair[::-1]:
                step()
    finally:
        raw.close()
        store.close()
    print(f"  sqlite: first stats at {size:,} (folds the table in) {fold:.2f} s")
    return [
        _result("sqlite", size, subject, baseline),
        Result(
            bench="status",
            case=f"sqlite, {fmt(size)} jobs: first stats after the build (one-time fold)",
            subject=Series("first stats", "s", (fold,), higher=False),
            baseline=None,
            ratio=None,
        ),
    ]


def _result(backend: str, size: int, subject: list[float], baseline: list[float]) -> Result:
    ratios = tuple(s / statistics.median(baseline) for s in subject)
    return Result(
        bench="status",
        case=f"{backend}, {fmt(size)} jobs, 99% finished",
        subject=Series("stats()", "s", tuple(subject), higher=False),
        baseline=Series("full count", "s", tuple(baseline), higher=False),
        ratio=Series("ratio", "x", ratios, higher=False),
        target=Target(1.0, at_most=True),
        note=f"stats median {statistics.median(subject):.3f} s (target < {TARGET_SECONDS:g} s)",
        ok=statistics.median(subject) < TARGET_SECONDS,
    )


def _postgres(settings: Settings, size: int) -> list[Result]:
    import psycopg
    from psycopg import sql

    from impl.postgres.store import PostgresStore

    url = settings.pg_url
    assert url
    keep = _keep() is not None
    schema = f"bench_status_keep_{size}" if keep else f"bench_status_{uuid.uuid4().hex[:8]}"
    config = Config(postgres_schema=schema)
    with psycopg.connect(url, autocommit=True) as conn:
        kept = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
    if kept:
        print(f"  postgres: reusing schema {schema}")
    else:
        _build_postgres(url, schema, config, size)
    store = PostgresStore(url, config=config)
    raw = psycopg.connect(url, autocommit=True)
    raw.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    try:
        assert sum(store.stats().by_state[ledger.KIND].values()) == size
        subject: list[float] = []
        baseline: list[float] = []
        for i in range(settings.runs):
            pair = [
                lambda: subject.extend(_median_seconds(store.stats, CALLS)),
                lambda: baseline.extend(
                    _median_seconds(
                        lambda: raw.execute(
                            "SELECT kind, state, count(*) FROM jobs GROUP BY kind, state"
                        ).fetchall(),
                        1,
                    )
                ),
            ]
            for step_fn in pair if i % 2 == 0 else pair[::-1]:
                step_fn()
    finally:
        store.close()
        if not keep:
            raw.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        raw.close()
    return [_result("postgres", size, subject, baseline)]


def _build_postgres(url: str, schema: str, config: Config, size: int) -> None:
    import psycopg
    from psycopg import sql

    from impl.postgres.store import PostgresStore

    with PostgresStore(url, config=config) as setup:
        setup.register(ledger.WORKFLOW)
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        conn.execute("SET maintenance_work_mem = '256MB'")
        # Secondary indexes are dropped and rebuilt once: a sort instead of N inserts.
        indexes = conn.execute(
            "SELECT i.indexname, i.indexdef FROM pg_indexes i"
            " WHERE i.schemaname = %s AND i.tablename = 'jobs' AND NOT EXISTS ("
            "   SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname"
            "   AND c.connamespace = %s::regnamespace)",
            (schema, schema),
        ).fetchall()
        for name, _definition in indexes:
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
        # Bulk load: the guard trigger (a check per row) is off for the load only.
        conn.execute("ALTER TABLE jobs DISABLE TRIGGER jobs_guard")
        step = 1_000_000
        for low in range(0, size, step):
            conn.execute(
                """
                INSERT INTO jobs (job_id, kind, identity, payload, state, active, attempts,
                    max_attempts, priority, run_at, token, created_at, updated_at)
                SELECT md5(%(tag)s || i) || md5(i || %(tag)s), %(kind)s,
                       '{"n":' || i || '}', 'null',
                       CASE WHEN i %% 100 = 0 THEN 'PLANNED' ELSE 'DONE' END, i %% 100 = 0,
                       0, 5, 0, 0, 0, 0, 0
                FROM generate_series(%(low)s, %(high)s) AS i
                """,
                {"tag": schema, "kind": ledger.KIND, "low": low, "high": min(size, low + step) - 1},
            )
        conn.execute("ALTER TABLE jobs ENABLE TRIGGER jobs_guard")
        for _name, definition in indexes:
            conn.execute(definition)  # the server's own text of the index
        conn.execute("VACUUM ANALYZE jobs")
    print(f"  postgres: built {size:,} jobs in {time.perf_counter() - started:.1f} s")


def run(settings: Settings) -> list[Result]:
    # JOBLEDGER_BENCH_STATUS_BACKENDS=postgres (or sqlite) measures one backend only.
    wanted = os.environ.get("JOBLEDGER_BENCH_STATUS_BACKENDS", "sqlite,postgres").split(",")
    results: list[Result] = []
    for size in _sizes(settings):
        if "sqlite" in wanted:
            results += _sqlite(settings, size)
        if settings.pg_url and "postgres" in wanted:
            results += _postgres(settings, size)
    return results
