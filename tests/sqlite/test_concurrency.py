"""Concurrent workers on one SQLite file: threads of one store, and separate processes.

Every grant is exclusive (a job is never held by two workers at once, each token is
granted once), and no busy error surfaces: BEGIN IMMEDIATE waits for the write lock.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import threading
from collections import Counter
from multiprocessing.queues import Queue
from pathlib import Path

import pytest

from impl.sqlite.schema import MIGRATIONS
from impl.sqlite.store import SqliteStore
from model import Event, Workflow
from tests.sqlite.proc import PROC_FLOW_NAME, WorkerReport, drain, open_and_plan

PROC_FLOW = Workflow(
    name=PROC_FLOW_NAME,
    states=["NEW", "MID", "DONE"],
    transitions=[("NEW", "MID"), ("MID", "DONE")],
    initial="NEW",
    terminal=["DONE"],
)


@pytest.mark.xdist_group("processes")
@pytest.mark.timeout(120)
def test_processes_share_one_file_without_busy_errors_or_shared_jobs(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with SqliteStore(path) as store:
        store.register(PROC_FLOW)
        ids = store.plan_many(PROC_FLOW_NAME, [{"n": n} for n in range(360)])
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(3)
    queue: Queue[WorkerReport] = context.Queue()
    workers = [
        context.Process(target=drain, args=(str(path), f"proc{i}", start, queue)) for i in range(3)
    ]
    for worker in workers:
        worker.start()
    try:
        reports = [queue.get(timeout=90) for _ in workers]
    finally:
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
                worker.join()
    for report in reports:
        assert report.error is None, f"{report.name} failed:\n{report.error}"
    # Waiting for the write lock is not fair (impl.sqlite.waiting): a process that keeps
    # losing the race for it can end up with no job at all. Exclusivity
    # and the absence of busy errors are what this test checks; it only needs to know
    # that at least two processes really contended.
    contended = [r.name for r in reports if r.grants]
    assert len(contended) >= 2, f"only {contended} got jobs: the test did not contend"
    grants = [g for r in reports for g in r.grants]
    assert sorted(j for j, _ in grants) == sorted(ids), "a job was lost or leased twice"
    with SqliteStore(path) as store:
        assert {store.state(j) for j in ids} == {"DONE"}
        for job_id in ids:
            leased = [h for h in store.history(job_id) if h.event is Event.LEASED]
            assert len(leased) == 1
            holder = next(r.name for r in reports if (job_id, leased[0].token) in r.grants)
            assert leased[0].worker == holder
            assert {e.token for e in store.effects(job_id)} == {leased[0].token}


@pytest.mark.timeout(60)
def test_threads_of_one_store_never_share_a_live_lease(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with SqliteStore(path) as store:
        store.register(PROC_FLOW)
        ids = store.plan_many(PROC_FLOW_NAME, [{"n": n} for n in range(80)])
        held: set[str] = set()
        guard = threading.Lock()
        grants: Counter[str] = Counter()
        errors: list[BaseException] = []
        connections: set[int] = set()

        def work(name: str) -> None:
            try:
                connections.add(id(store._connection()))
                while (lease := store.lease_next(name, ttl=60.0)) is not None:
                    with guard:
                        assert lease.job_id not in held, f"{lease.job_id} has two holders"
                        held.add(lease.job_id)
                        grants[lease.job_id] += 1
                    if lease.state == "NEW":
                        # Half the work, then give the job back for another thread.
                        assert store.advance(lease, "MID")
                        with guard:
                            held.discard(lease.job_id)
                        store.release(lease)
                    else:
                        assert store.advance(lease, "DONE")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(50)
        assert not errors, errors
        assert len(connections) == 4, "threads must not share a connection"
        assert grants == Counter(dict.fromkeys(ids, 2))
        assert {store.state(j) for j in ids} == {"DONE"}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.timeout(60)
def test_a_forked_child_opens_its_own_connection(tmp_path: Path) -> None:
    """A connection carried across fork would share the parent's locks and file state;
    the child must neither use nor free any of the parent's connections (freeing closes,
    and closing can checkpoint and unlink the parent's WAL)."""
    from impl.sqlite import connection

    path = tmp_path / "db.sqlite"
    with SqliteStore(path) as store:
        parent_conn = store._connection()
        first = store.plan("download", {"url": "parent"})
        opened = threading.Event()
        leave = threading.Event()

        def hold_a_connection() -> None:
            store._connection()
            opened.set()
            leave.wait(30)

        holder = threading.Thread(target=hold_a_connection)
        holder.start()
        assert opened.wait(10)
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child reports through its exit code)
            code = 1
            try:
                pinned = {id(h.conn) for h in connection._PINNED}
                fresh = store._connection() is not parent_conn
                store.plan("download", {"url": "child"})
                ok = fresh and id(parent_conn) in pinned and len(pinned) >= 2
                code = 0 if ok and store.state(first) == "PLANNED" else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        leave.set()
        holder.join(10)
        assert os.waitstatus_to_exitcode(status) == 0
        assert connection._PINNED == []
        assert store._connection() is parent_conn
        assert len(store.jobs()) == 2
        assert parent_conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.xdist_group("processes")
@pytest.mark.timeout(120)
def test_processes_opening_a_fresh_file_together_migrate_it_once(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(3)
    queue: Queue[str | None] = context.Queue()
    openers = [
        context.Process(target=open_and_plan, args=(str(path), start, queue)) for _ in range(3)
    ]
    for opener in openers:
        opener.start()
    try:
        errors = [queue.get(timeout=90) for _ in openers]
    finally:
        for opener in openers:
            opener.join(10)
            if opener.is_alive():
                opener.kill()
                opener.join()
    assert errors == [None, None, None], "\n".join(e for e in errors if e)
    conn = sqlite3.connect(path)
    try:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
        assert versions == [m.version for m in MIGRATIONS]
        assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM workflows").fetchone()[0] == 1
    finally:
        conn.close()
