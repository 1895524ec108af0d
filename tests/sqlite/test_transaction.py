"""How the SQLite backend talks to SQLite: write transactions, pragmas, the claim index.

A deferred transaction that reads and then writes fails at once with SQLITE_BUSY_SNAPSHOT
whatever the busy timeout, so every write must start with BEGIN IMMEDIATE; pragmas are
per connection, so every connection (each thread has its own) must carry them.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from impl.sqlite import queries as q
from impl.sqlite.store import SqliteStore
from model import Config, EffectResultError, ManualClock, Plan, StorageError, Workflow

FLOW = Workflow(
    name="flow",
    states=["A", "B", "C"],
    transitions=[("A", "B"), ("B", "C")],
    initial="A",
    terminal=["C"],
)

WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


def _transactions(statements: list[str]) -> list[list[str]]:
    """Split traced statements into transactions (BEGIN ... COMMIT/ROLLBACK) and loose ones."""
    out: list[list[str]] = []
    current: list[str] | None = None
    for raw in statements:
        sql = " ".join(raw.split())
        if sql.startswith("--"):
            continue  # a trigger's body, reported inside its statement
        upper = sql.upper()
        if upper.startswith("BEGIN"):
            assert current is None, f"nested BEGIN: {sql}"
            current = [sql]
        elif upper.startswith(("COMMIT", "ROLLBACK")):
            assert current is not None, f"{sql} outside a transaction"
            current.append(sql)
            out.append(current)
            current = None
        elif current is not None:
            current.append(sql)
        else:
            out.append([sql])
    assert current is None, "a transaction was left open"
    return out


def test_every_write_transaction_begins_immediate(tmp_path: Path) -> None:
    clock = ManualClock()
    store = SqliteStore(tmp_path / "db.sqlite", clock=clock, config=Config(result_limit=64))
    statements: list[str] = []
    store._connection().set_trace_callback(statements.append)
    try:
        store.register(FLOW)
        a = store.plan("flow", {"n": 1})
        store.plan_many("flow", [{"n": 2}, Plan({"n": 3}, priority=1)])
        lease = store.lease_next("w1", ttl=10)
        assert lease is not None
        lease = store.renew(lease)
        assert store.advance(lease, "B")
        assert store.run_effect(lease, "ok", lambda ctx: {"n": 1}) == {"n": 1}
        with pytest.raises(ZeroDivisionError):
            store.run_effect(lease, "boom", lambda ctx: 1 / 0)
        with pytest.raises(EffectResultError):
            store.run_effect(lease, "big", lambda ctx: "x" * 100)
        store.release(lease)
        lease = store.lease_next("w1", ttl=10)
        assert lease is not None
        store.fail(lease, "oops", retryable=False)
        store.retry(lease.job_id)
        store.cancel(a, "no longer needed")
        lease = store.lease_next("w2", ttl=1)
        clock.advance(5)
        store.reconcile()
    finally:
        store._connection().set_trace_callback(None)
        store.close()
    transactions = _transactions(statements)
    writing = [t for t in transactions if any(s.upper().startswith(WRITES) for s in t)]
    assert len(writing) >= 15, f"expected a transaction per write call, got {len(writing)}"
    for tx in writing:
        assert tx[0].upper() == "BEGIN IMMEDIATE", f"a write outside BEGIN IMMEDIATE: {tx}"
        assert tx[-1].upper() == "COMMIT", f"a write transaction did not commit: {tx}"
    # Deferred transactions are for read snapshots only.
    for tx in transactions:
        if tx[0].upper().startswith("BEGIN") and tx[0].upper() != "BEGIN IMMEDIATE":
            assert not any(s.upper().startswith(WRITES) for s in tx), tx


def _pragmas(store: SqliteStore) -> tuple[object, ...]:
    conn = store._connection()
    return (
        conn.execute("PRAGMA journal_mode").fetchone()[0],
        conn.execute("PRAGMA synchronous").fetchone()[0],
        conn.execute("PRAGMA foreign_keys").fetchone()[0],
        # SQLite's own busy handler is off: jobledger waits (impl.sqlite.waiting), for
        # the configured busy_timeout.
        conn.execute("PRAGMA busy_timeout").fetchone()[0],
        conn.wait_limit,
        conn.isolation_level,
    )


def test_pragmas_apply_to_every_threads_connection(tmp_path: Path) -> None:
    config = Config(sqlite_synchronous="FULL", busy_timeout=2.5)
    with SqliteStore(tmp_path / "db.sqlite", config=config) as store:
        expected = ("wal", 2, 1, 0, 2.5, None)
        assert _pragmas(store) == expected
        seen: list[object] = []

        def other_thread() -> None:
            seen.append(_pragmas(store))
            seen.append(store._connection() is not main)
            seen.append(store.plan("download", {"url": "t"}))

        main = store._connection()
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join(10)
        assert seen[:2] == [expected, True]
        assert store.state(str(seen[2])) == "PLANNED"


def test_default_synchronous_is_normal(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "db.sqlite") as store:
        assert store._connection().execute("PRAGMA synchronous").fetchone()[0] == 1


def _plan_of(store: SqliteStore, sql: str, params: dict[str, object]) -> str:
    rows = store._connection().execute("EXPLAIN QUERY PLAN " + sql, params)
    return " | ".join(str(row[3]) for row in rows)


def test_lease_next_walks_the_active_index_without_sorting(tmp_path: Path) -> None:
    """A claim is an ordered walk of the partial index of active jobs at any size: no
    sort, no scan of the table (finished jobs are not even in the index)."""
    kinds: dict[str, object] = {"now": 0.0, "kinds": '["download"]'}
    kind: dict[str, object] = {"now": 0.0, "kind": "download"}
    plain: dict[str, object] = {"now": 0.0}
    with SqliteStore(tmp_path / "db.sqlite") as store:
        for sql, params in (
            (q.SELECT_CANDIDATE, plain),
            (q.SELECT_CANDIDATE_OF_KIND, kind),
            (q.SELECT_CANDIDATE_OF_KINDS, kinds),
        ):
            plan = _plan_of(store, sql, params)
            assert "USING INDEX jobs_active" in plan, plan
            assert "TEMP B-TREE" not in plan, plan
            assert "SCAN jobs" not in plan.replace("SCAN jobs USING INDEX jobs_active", ""), plan


def test_leases_are_found_among_the_active_jobs_only(tmp_path: Path) -> None:
    """Reconcile, the lease listing and the stats read the active jobs, never all jobs."""
    with SqliteStore(tmp_path / "db.sqlite") as store:
        for sql in (
            q.SELECT_EXPIRED_LEASES,
            q.COUNT_EXPIRED_LEASES,
            q.SELECT_LEASES,
            q.ACTIVE_SUMMARY,
        ):
            plan = _plan_of(store, sql, {"now": 0.0})
            assert "USING INDEX jobs_active" in plan, plan
            assert "SCAN jobs" not in plan.replace("SCAN jobs USING INDEX jobs_active", ""), plan


def test_close_closes_the_connection_and_refuses_further_calls(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite")
    conn = store._connection()
    job_id = store.plan("download", {"url": "u"})
    store.close()
    with pytest.raises(sqlite3.ProgrammingError):
        conn.execute("SELECT 1")
    with pytest.raises(StorageError, match="closed"):
        store.state(job_id)
    store.close()  # idempotent
    with SqliteStore(tmp_path / "db.sqlite") as again:
        assert again.state(job_id) == "PLANNED"


def test_the_one_statement_claim_walks_the_active_index_without_sorting(tmp_path: Path) -> None:
    """lease_next's fast path makes the same ordered walk as the general one."""
    params: dict[str, object] = {
        "now": 0.0,
        "worker": "w",
        "expires_at": 1.0,
        "at": "0.0",
        "worker_text": '"w"',
    }
    kinds: dict[str, object] = {**params, "kinds": '["download"]'}
    kind: dict[str, object] = {**params, "kind": "download"}
    with SqliteStore(tmp_path / "db.sqlite") as store:
        for sql, args in (
            (q.CLAIM_FIRST, params),
            (q.CLAIM_FIRST_OF_KIND, kind),
            (q.CLAIM_FIRST_OF_KINDS, kinds),
        ):
            plan = _plan_of(store, sql, args)
            assert "USING INDEX jobs_active" in plan, plan
            assert "TEMP B-TREE" not in plan, plan
            assert "SCAN jobs" not in plan.replace("SCAN jobs USING INDEX jobs_active", ""), plan


def _page_size(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        (size,) = conn.execute("PRAGMA page_size").fetchone()
    finally:
        conn.close()
    assert isinstance(size, int)
    return size


def test_a_new_ledger_has_small_pages_and_an_old_one_keeps_its_own(tmp_path: Path) -> None:
    """Commits write whole pages: a new file gets 2 KiB pages; a file created with
    SQLite's default 4 KiB ones (by an older jobledger) keeps them and works as ever."""
    new = tmp_path / "new.sqlite"
    with SqliteStore(new) as store:
        store.register(FLOW)
        store.plan("flow", {"n": 1})
    assert _page_size(new) == q.NEW_FILE_PAGE_SIZE == 2048

    old = tmp_path / "old.sqlite"
    conn = sqlite3.connect(old)
    conn.execute("PRAGMA page_size = 4096")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE before (x)")
    conn.close()
    with SqliteStore(old, clock=ManualClock()) as store:
        store.register(FLOW)
        job_id = store.plan("flow", {"n": 1})
        lease = store.lease_next("w")
        assert lease is not None
        assert store.advance(lease, "B")
        assert store.job(job_id).state == "B"
    assert _page_size(old) == 4096


def test_a_workflow_read_once_is_answered_without_a_statement(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with SqliteStore(path) as first:
        first.register(FLOW)
    store = SqliteStore(path)  # a fresh handle: nothing cached yet
    statements: list[str] = []
    store._connection().set_trace_callback(statements.append)
    try:
        assert store.workflow("flow") == FLOW
        assert any("workflows" in s for s in statements), "the first lookup reads the row"
        statements.clear()
        assert store.workflow("flow") == FLOW
        assert statements == []
    finally:
        store._connection().set_trace_callback(None)
        store.close()
    with pytest.raises(StorageError, match="closed"):
        store.workflow("flow")
