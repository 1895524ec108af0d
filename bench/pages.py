"""Benchmark 8, page size: why a new ledger file gets 2 KiB pages.

Subject: the store on a new file, as ``open_store`` makes it (2 KiB pages, see
``impl.sqlite.queries.NEW_FILE_PAGE_SIZE``). Baseline: the same store on a file created
beforehand with SQLite's default 4 KiB pages, which the store keeps (as it keeps the page
size of any existing file). Three workloads, interleaved run by run:

- the ``lifecycle`` benchmark's jobs (small rows: lease, one no-op effect, advance);
- bigger rows, closer to a download pipeline: an identity with a URL, a payload and two
  effect results of a few hundred bytes each, three advances per job;
- ``plan_many`` of 10,000 new jobs, where smaller pages cost more pages per row inserted.
"""

from __future__ import annotations

import functools
import sqlite3
from pathlib import Path

import impl
from bench import ledger, lifecycle
from bench.harness import Result, Settings, compare, stopwatch

BIG = impl.Workflow(
    "fetch",
    ("PLANNED", "HEADED", "FETCHED", "DONE"),
    (("PLANNED", "HEADED"), ("HEADED", "FETCHED"), ("FETCHED", "DONE")),
    "PLANNED",
    ("DONE",),
)
DEFAULT_PAGE = 4096


def _file(settings: Settings, name: str, page_size: int | None) -> Path:
    """A path for a new ledger; with ``page_size``, a file already created with it."""
    path = settings.scratch(name) / "ledger.sqlite"
    if page_size is not None:
        conn = sqlite3.connect(path)
        try:
            conn.execute(f"PRAGMA page_size = {int(page_size)}")
            conn.execute("PRAGMA journal_mode = WAL").fetchall()
            conn.execute("CREATE TABLE created_before (x)")
        finally:
            conn.close()
    return path


def _big_items(n: int) -> list[impl.Plan]:
    return [
        impl.Plan(
            identity={
                "work_id": f"w{i}",
                "artifact_id": f"a{i}",
                "canonical_url": f"https://example.org/datasets/2026/collection-{i}/files/"
                f"part-{i:06d}.tar.gz?version=3&format=original",
            },
            payload={
                "headers": {"accept": "application/octet-stream", "user-agent": "bench/1.0"},
                "size_hint": 123456789,
                "mirrors": [f"https://m{k}.example.org/p/{i}" for k in range(3)],
            },
        )
        for i in range(n)
    ]


def _response(_ctx: impl.EffectContext) -> impl.JSON:
    return {"status": 200, "etag": '"' + "e" * 40 + '"', "length": 123456789, "sha256": "f" * 64}


def _small(settings: Settings, n: int, page_size: int | None, _run: int = 0) -> float:
    return lifecycle.api_rate(_file(settings, f"pages-small-{page_size}", page_size), n)


def _big(settings: Settings, n: int, page_size: int | None, _run: int = 0) -> float:
    path = _file(settings, f"pages-big-{page_size}", page_size)
    with ledger.open_sqlite(path) as store:
        store.register(BIG)
        store.plan_many(BIG.name, _big_items(n))
        done = 0
        with stopwatch() as t:
            while (lease := store.lease_next("bench")) is not None:
                store.run_effect(lease, "HEAD", _response)
                store.advance(lease, "HEADED")
                store.run_effect(lease, "GET", _response)
                store.advance(lease, "FETCHED")
                store.advance(lease, "DONE")
                done += 1
    if done != n:
        raise RuntimeError(f"bigger rows: {done}/{n} done")
    return n / t[0]


def _plan(settings: Settings, n: int, page_size: int | None, _run: int = 0) -> float:
    path = _file(settings, f"pages-plan-{page_size}", page_size)
    items = ledger.identities(n)
    with ledger.open_sqlite(path) as store, stopwatch() as t:
        store.plan_many(ledger.KIND, items)
    return n / t[0]


def run(settings: Settings) -> list[Result]:
    cases = (
        ("lifecycle, small rows", _small, 200 if settings.quick else 1000, "jobs/s"),
        (
            "lifecycle, bigger rows (5 calls per job)",
            _big,
            100 if settings.quick else 500,
            "jobs/s",
        ),
        ("plan_many, new jobs in one call", _plan, 2000 if settings.quick else 10000, "rows/s"),
    )
    return [
        compare(
            settings.runs,
            bench="page size",
            case=f"{case}, {n}",
            unit=unit,
            subject=("2 KiB pages", functools.partial(fn, settings, n, None)),
            baseline=("4 KiB pages", functools.partial(fn, settings, n, DEFAULT_PAGE)),
        )
        for case, fn, n, unit in cases
    ]
