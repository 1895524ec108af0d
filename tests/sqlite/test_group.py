"""Group commit (impl.sqlite.group): the writes of a process's threads share transactions.

Most tests gather a group on purpose: the test thread holds the group's lock while real
threads queue behind it, then lets them go together, so they form one group transaction
(the first begins it, the others join it in savepoints). What each thread's call returns
or raises, and what a fresh connection reads afterwards, is then checked.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest

from impl import failpoint
from impl.sqlite.connection import Tx
from impl.sqlite.group import Group
from impl.sqlite.store import SqliteStore
from impl.worker import JobContext, Worker
from model import Config, EffectContext, Lease, LeaseLost, Workflow

FLOW = Workflow("flow", ["NEW", "DONE"], [("NEW", "DONE")], "NEW", ["DONE"])
# A window long enough that a gathered group never commits for its age alone.
GROUPED = Config(sqlite_group_window=5.0, busy_timeout=10.0)


@pytest.fixture(autouse=True)
def _disarm() -> Iterator[None]:
    failpoint.disarm_all()
    yield
    failpoint.disarm_all()


def _group(store: SqliteStore) -> Group:
    group = store._connections._group
    assert group is not None
    return group


def _leased(store: SqliteStore, n: int) -> list[Lease]:
    store.register(FLOW)
    store.plan_many("flow", [{"n": i} for i in range(n)])
    leases = [store.lease_next(f"w{i}") for i in range(n)]
    assert all(lease is not None for lease in leases)
    return [lease for lease in leases if lease is not None]


def _states(path: Path) -> dict[str, str]:
    """The jobs' states as a connection of its own reads them: only what was committed."""
    with closing(sqlite3.connect(path)) as conn:
        return dict(conn.execute("SELECT job_id, state FROM jobs").fetchall())


Outcome = tuple[str, object]


def _gathered(store: SqliteStore, calls: list[Callable[[], object]]) -> list[Outcome]:
    """Run ``calls`` in threads of their own, all queued behind the group's lock first,
    so that they make one group; return what each returned or raised."""
    group = _group(store)
    outcomes: list[Outcome] = [("none", None)] * len(calls)

    def run(i: int) -> None:
        try:
            outcomes[i] = ("ok", calls[i]())
        except BaseException as exc:
            outcomes[i] = ("err", exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    assert group.lock.acquire(timeout=10)
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while group.waiting < len(calls):
            assert time.monotonic() < deadline, "the threads never queued for the group"
            time.sleep(0.001)
    finally:
        group.lock.release()
    for t in threads:
        t.join(20)
        assert not t.is_alive()
    return outcomes


def test_queued_writers_share_one_commit(tmp_path: Path) -> None:
    """Three advances queued together commit in one group transaction, and each call
    returns only once that commit made its write visible to other connections."""
    path = tmp_path / "db.sqlite"
    with SqliteStore(path, config=GROUPED) as store:
        leases = _leased(store, 3)
        seen: dict[str, str] = {}

        def advance(lease: Lease) -> Callable[[], object]:
            def call() -> object:
                moved = store.advance(lease, "DONE")
                seen[lease.job_id] = _states(path)[lease.job_id]
                return moved

            return call

        before = _group(store).epoch
        outcomes = _gathered(store, [advance(lease) for lease in leases])
        assert outcomes == [("ok", True)] * 3
        assert _group(store).epoch == before + 1
        assert seen == {lease.job_id: "DONE" for lease in leases}


def test_an_error_in_one_member_rolls_back_only_its_own_writes(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with SqliteStore(path, config=GROUPED) as store:
        first, stale, third = _leased(store, 3)
        store.release(stale)
        again = store.lease_next("w9")
        assert again is not None
        assert again.job_id == stale.job_id
        before = _group(store).epoch
        outcomes = _gathered(
            store,
            [
                lambda: store.advance(first, "DONE"),
                lambda: store.renew(stale),  # a stale token: refused, nothing written
                lambda: store.advance(third, "DONE"),
            ],
        )
        assert outcomes[0] == ("ok", True)
        assert outcomes[1][0] == "err"
        assert isinstance(outcomes[1][1], LeaseLost)
        assert outcomes[2] == ("ok", True)
        # One group; two when the refused call happened to begin it: the first member's
        # error rolls back the whole transaction, which holds its writes alone.
        assert _group(store).epoch - before in (1, 2)
        states = _states(path)
        assert (states[first.job_id], states[stale.job_id], states[third.job_id]) == (
            "DONE",
            "NEW",
            "DONE",
        )
        assert store.job(stale.job_id).token == again.token
        assert store.job(stale.job_id).lease == again


def _crashed(store: SqliteStore, point: str) -> tuple[list[Lease], list[Outcome]]:
    leases = _leased(store, 3)
    failpoint.arm(point)
    outcomes = _gathered(
        store, [lambda lease=lease: store.advance(lease, "DONE") for lease in leases]
    )
    return leases, outcomes


def _crashes(outcomes: list[Outcome]) -> list[int]:
    return [
        i
        for i, (kind, value) in enumerate(outcomes)
        if kind == "err" and isinstance(value, failpoint.Crash)
    ]


def test_a_crash_in_one_members_savepoint_rolls_back_that_member_only(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = SqliteStore(path, config=GROUPED)
    try:
        leases, outcomes = _crashed(store, "group.in_savepoint")
    finally:
        store.close()
    (dead,) = _crashes(outcomes)
    assert [o for i, o in enumerate(outcomes) if i != dead] == [("ok", True)] * 2
    states = _states(path)
    assert [states[lease.job_id] for lease in leases] == [
        "NEW" if i == dead else "DONE" for i in range(3)
    ]
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_crash_before_the_group_commit_loses_every_member(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = SqliteStore(path, config=GROUPED)
    try:
        leases, outcomes = _crashed(store, "group.before_commit")
    finally:
        store.close()
    assert _crashes(outcomes) == [0, 1, 2], outcomes
    assert {_states(path)[lease.job_id] for lease in leases} == {"NEW"}


def test_a_crash_after_the_group_commit_keeps_every_member(tmp_path: Path) -> None:
    """The thread that committed dies after the commit; the others return normally."""
    path = tmp_path / "db.sqlite"
    store = SqliteStore(path, config=GROUPED)
    try:
        leases, outcomes = _crashed(store, "group.after_commit")
    finally:
        store.close()
    (dead,) = _crashes(outcomes)
    assert [o for i, o in enumerate(outcomes) if i != dead] == [("ok", True)] * 2
    assert {_states(path)[lease.job_id] for lease in leases} == {"DONE"}


def test_a_failed_group_commit_fails_every_member(tmp_path: Path) -> None:
    """A COMMIT that fails reaches every member as a storage error, and nothing of theirs
    is written. Here one member defers a foreign key violation to the COMMIT (which
    SQLite then refuses), as a corrupting bug would."""
    path = tmp_path / "db.sqlite"
    with SqliteStore(path, config=GROUPED) as store:
        leases = _leased(store, 3)

        def sabotage() -> object:
            conn = store._connection()
            with Tx(conn, "sabotage"):
                conn.execute("PRAGMA defer_foreign_keys = ON")
                conn.execute("UPDATE workflow_states SET kind = 'nope' WHERE kind = 'flow'")
            return None

        calls: list[Callable[[], object]] = [
            lambda lease=lease: store.advance(lease, "DONE") for lease in leases
        ]
        outcomes = _gathered(store, [*calls, sabotage])
        kinds = [(kind, type(value).__name__) for kind, value in outcomes]
        assert kinds == [("err", "StorageError")] * 4, outcomes
        assert {_states(path)[lease.job_id] for lease in leases} == {"NEW"}
        # The group is usable again afterwards.
        assert store.advance(leases[1], "DONE") is True
        assert _states(path)[leases[1].job_id] == "DONE"


def test_a_group_left_open_by_threads_that_gave_up_is_committed_by_its_member(
    tmp_path: Path,
) -> None:
    """A member that leaves its group open for a queued thread, which then gives up
    waiting (nothing to do, or its busy timeout) without joining, commits the group
    itself once it has waited a while: its call still returns, durable. The thread that
    gives up is played by the queue's counter."""
    path = tmp_path / "db.sqlite"
    with SqliteStore(path, config=GROUPED) as store:
        (lease,) = _leased(store, 1)
        group = _group(store)
        before = group.epoch
        with group.mutex:
            group.waiting += 1  # one thread queued, which will never take the lock
        try:
            (outcome,) = _run_alone(lambda: store.advance(lease, "DONE"))
        finally:
            with group.mutex:
                group.waiting -= 1
        assert outcome == ("ok", True)
        assert group.epoch == before + 1
        assert _states(path)[lease.job_id] == "DONE"


def _run_alone(call: Callable[[], object]) -> list[Outcome]:
    outcomes: list[Outcome] = [("none", None)]

    def run() -> None:
        try:
            outcomes[0] = ("ok", call())
        except BaseException as exc:
            outcomes[0] = ("err", exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(20)
    assert not thread.is_alive()
    return outcomes


def _slow(ctx: EffectContext) -> dict[str, int]:
    time.sleep(0.002)
    return {"token": ctx.token}


def _handler(ctx: JobContext) -> None:
    ctx.effect("io", _slow)
    ctx.advance("DONE")


def test_many_threads_drain_a_grouped_ledger(tmp_path: Path) -> None:
    """A Worker of 16 threads on a grouped store: every job ends once, every effect is
    recorded once under the token that ran it, and transactions were shared."""
    path = tmp_path / "db.sqlite"
    jobs = 160
    with SqliteStore(path, config=Config(sqlite_group_window=0.002)) as store:
        store.register(FLOW)
        ids = store.plan_many("flow", [{"n": i} for i in range(jobs)])
        before = _group(store).epoch
        report = Worker(store, {"flow": _handler}, concurrency=16, idle_poll=0.01).run(
            until_idle=True
        )
        assert report.finished == jobs
        # Four transactions per job (lease, start, result, advance), in fewer groups.
        assert _group(store).epoch - before < 4 * jobs
        for job_id in ids:
            info = store.job(job_id)
            assert info.state == "DONE"
            (effect,) = store.effects(job_id)
            assert effect.result == {"token": info.token}
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_stores_of_one_process_on_one_file_share_a_group(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with SqliteStore(path, config=GROUPED) as a, SqliteStore(path, config=GROUPED) as b:
        assert _group(a) is _group(b)
        group = _group(a)
    # The last store to close closes the group's connection.
    assert group.held is None


def test_an_ungrouped_store_has_no_group() -> None:
    assert Config().sqlite_group_window == 0.0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_inherit_a_held_group(tmp_path: Path) -> None:
    """A group whose lock a parent's thread held at fork time would never open in the
    child; the child's store gets a group of its own."""
    path = tmp_path / "db.sqlite"
    with SqliteStore(path, config=GROUPED) as store:
        store.register(FLOW)
        group = _group(store)
        with group.lock:
            pid = os.fork()
            if pid == 0:  # the child: write through the inherited store, report by status
                code = 1
                try:
                    store.plan("flow", {"n": "from the child"})
                    code = 0
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert len(store.jobs()) == 1
