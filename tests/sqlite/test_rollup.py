"""The watermark counts of finished jobs (impl/sqlite/rollup.py).

``stats`` must count exactly what a full count would, whatever happened behind the
watermark (jobs finishing after it passed them, an operator's retry, prunes, jobs planned
after a prune), and the hot path must never touch the counts: they cost the lifecycle
nothing.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from impl.sqlite import rollup
from impl.sqlite.store import SqliteStore
from model import ManualClock, Workflow

FLOW = Workflow(
    name="f",
    states=["A", "B", "C"],
    transitions=[("A", "B"), ("B", "C")],
    initial="A",
    terminal=["C"],
)


def full_count(path: Path) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    with closing(sqlite3.connect(path)) as conn:
        for kind, state, n in conn.execute("SELECT kind, state, count(*) FROM jobs GROUP BY 1, 2"):
            out.setdefault(kind, {})[state] = n
    return out


def shown(store: SqliteStore) -> dict[str, dict[str, int]]:
    return {
        kind: {s: n for s, n in states.items() if n}
        for kind, states in store.stats().by_state.items()
        if any(states.values())
    }


def mark(path: Path) -> int:
    with closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("SELECT seq FROM count_mark").fetchone()[0])


def finish(store: SqliteStore, n: int) -> None:
    for _ in range(n):
        lease = store.lease_next("w")
        assert lease is not None
        store.advance(lease, "B")
        store.advance(lease, "C")


def test_counts_stay_exact_behind_and_past_the_watermark(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    clock = ManualClock()
    with SqliteStore(path, clock=clock) as store:
        store.register(FLOW)
        ids = store.plan_many("f", [{"n": i} for i in range(10)])
        finish(store, 4)
        failed = ids[4]
        store.cancel(failed, "no")
        assert shown(store) == full_count(path)
        store.reconcile()  # the watermark passes every job: 5 counted, 5 pending
        assert mark(path) == 10
        assert shown(store) == full_count(path)
        finish(store, 2)  # pending jobs finish behind the watermark
        assert shown(store) == full_count(path)
        store.retry(failed)  # a counted failed job becomes active again
        assert shown(store) == full_count(path)
        store.reconcile()
        assert shown(store) == full_count(path)
        clock.advance(1)
        store.prune(finished_before=clock(), batch_size=3)  # counted and pending ones go
        assert shown(store) == full_count(path)
        store.plan_many("f", [{"m": i} for i in range(3)])  # numbered after the last job
        finish(store, 5)
        assert shown(store) == full_count(path)
        store.reconcile()
        assert shown(store) == full_count(path)


def test_a_prune_of_the_last_jobs_lowers_the_watermark(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    clock = ManualClock()
    with SqliteStore(path, clock=clock) as store:
        store.register(FLOW)
        store.plan_many("f", [{"n": i} for i in range(3)])
        finish(store, 3)
        store.reconcile()
        assert mark(path) == 3
        clock.advance(1)
        store.prune(finished_before=clock())
        assert mark(path) == 0
        store.plan("f", {"n": 99})  # gets number 1 again: past the watermark
        assert shown(store) == full_count(path) == {"f": {"A": 1}}


def test_stats_folds_a_long_tail_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rollup, "STATS_REFRESH_AT", 5)
    monkeypatch.setattr(rollup, "STEP", 4)
    path = tmp_path / "jobs.sqlite"
    with SqliteStore(path, clock=ManualClock()) as store:
        store.register(FLOW)
        store.plan_many("f", [{"n": i} for i in range(20)])
        finish(store, 7)
        assert shown(store) == full_count(path)
        assert mark(path) >= 15


def test_the_hot_path_never_touches_the_counts(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    with SqliteStore(path, clock=ManualClock()) as store:
        store.register(FLOW)
        store.plan_many("f", [{"n": i} for i in range(3)])
        seen: list[str] = []
        store._connection().set_trace_callback(seen.append)
        lease = store.lease_next("w")
        assert lease is not None
        store.run_effect(lease, "e", lambda ctx: 1)
        store.advance(lease, "B")
        store.advance(lease, "C")
        other = store.lease_next("w")
        assert other is not None
        store.fail(other, "no", retryable=False)
        store.plan("f", {"n": 100})
        store._connection().set_trace_callback(None)
        assert seen
        touched = [s for s in seen if "count_" in s or "state_counts" in s]
        assert touched == []


def test_stats_walks_the_active_jobs_once_unless_a_lease_expired(tmp_path: Path) -> None:
    # The in-doubt starts under an expired lease are found by a second walk of every
    # active job (half of what stats reads at 10M jobs): only when the first walk
    # counted an expired lease.
    from impl.sqlite import queries as q

    clock = ManualClock()
    with SqliteStore(tmp_path / "jobs.sqlite", clock=clock) as store:
        store.register(FLOW)
        store.plan(FLOW.name, {"n": 1})
        store.plan(FLOW.name, {"n": 2})
        lease = store.lease_next("w", ttl=10)
        assert lease is not None
        store.run_effect(lease, "e", lambda ctx: None)
        ran: list[str] = []
        store._connection().set_trace_callback(ran.append)
        assert store.stats().leases_live == 1
        expired_walk = "e.doubt = 0"  # only in q.COUNT_DEAD_STARTS_EXPIRED among stats' reads
        assert expired_walk in q.COUNT_DEAD_STARTS_EXPIRED
        assert not [s for s in ran if expired_walk in s]
        clock.advance(11)
        ran.clear()
        assert (store.stats().leases_expired, store.stats().in_doubt) == (1, 0)
        assert [s for s in ran if expired_walk in s]
        store._connection().set_trace_callback(None)
