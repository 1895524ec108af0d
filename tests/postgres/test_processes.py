"""Several real processes against one schema: claims never overlap, and concurrent
first opens serialise their migrations instead of failing."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

import psycopg
import pytest
from psycopg import sql

from impl.postgres.schema import MIGRATIONS
from model import Config, ManualClock, Plan
from model import Event as HistoryKind
from tests.pg import PG_URL
from tests.postgres import children
from tests.postgres.conftest import OpenStore

pytestmark = [pytest.mark.postgres, pytest.mark.xdist_group("processes")]

WATCHDOG = 60.0
"""Seconds a child may take before the test kills it and fails."""

Child = Callable[[str, str, str, Barrier, "Queue[children.Report]"], None]


@contextmanager
def spawned(target: Child, schema: str, count: int) -> Iterator[dict[str, object]]:
    """Start ``count`` children on ``target`` (they meet at a barrier), collect reports."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(count)
    out: Queue[children.Report] = ctx.Queue()
    procs = [
        ctx.Process(target=target, args=(PG_URL, schema, f"p{i}", start, out), daemon=True)
        for i in range(count)
    ]
    try:
        for proc in procs:
            proc.start()
        reports = dict(out.get(timeout=WATCHDOG) for _ in procs)
        for proc in procs:
            proc.join(WATCHDOG)
        yield reports
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        out.close()
        out.join_thread()


def test_skip_locked_workers_in_several_processes_never_share_a_job(
    open_pg: OpenStore, pg_schema: str
) -> None:
    parent = open_pg(clock=None)
    jobs = 60
    ids = parent.plan_many(
        "download",
        [
            Plan({"work_id": str(i), "artifact_id": "a", "canonical_url": "u"}, priority=i % 3)
            for i in range(jobs)
        ],
    )
    with spawned(children.claim_all, pg_schema, 3) as reports:
        pass
    claimed: list[tuple[str, int]] = []
    for name, report in reports.items():
        assert isinstance(report, list), f"{name} failed:\n{report}"
        claimed.extend(report)
    assert sorted(j for j, _ in claimed) == sorted(ids), "a job was lost or leased twice"
    assert {token for _, token in claimed} == {1}
    stats = parent.stats()
    assert stats.by_state["download"]["SKIPPED_DUPLICATE"] == jobs
    assert stats.leases_live == 0
    for job_id in ids[:10]:
        leased = [e for e in parent.history(job_id) if e.event is HistoryKind.LEASED]
        assert len(leased) == 1


def test_concurrent_first_opens_from_three_processes_all_succeed(pg_schema: str) -> None:
    with spawned(children.open_and_register, pg_schema, 3) as reports:
        pass
    for name, report in reports.items():
        assert report == ["download"], f"{name} failed:\n{report}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        rows = conn.execute(
            sql.SQL("SELECT version FROM {} ORDER BY version").format(
                sql.Identifier(pg_schema, "schema_migrations")
            )
        ).fetchall()
    assert [r[0] for r in rows] == [m.version for m in MIGRATIONS]


def test_a_manual_clock_is_used_by_every_process_that_injects_it(open_pg: OpenStore) -> None:
    """The injected clock wins over the server's, also for a second store."""
    clock = ManualClock(now=5.0)
    first = open_pg(clock=clock)
    job_id = first.plan("download", {"work_id": "w", "artifact_id": "a", "canonical_url": "u"})
    second = open_pg(clock=clock, config=Config(postgres_schema=first.config.postgres_schema))
    lease = second.lease_next("w", ttl=3)
    assert lease is not None
    assert lease.expires_at == 8.0
    assert first.job(job_id).created_at == 5.0
