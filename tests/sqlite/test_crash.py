"""Crashes at every generic failpoint of plan, advance and fail: after a reopen the change
is there exactly when the crash came after its commit, and the file is intact."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from impl import failpoint
from impl.sqlite.store import SqliteStore
from model import EffectContext, Lease, ManualClock

POINTS = ("before_tx", "before_commit", "after_commit")


@pytest.fixture(autouse=True)
def _disarm() -> Iterator[None]:
    failpoint.disarm_all()
    yield
    failpoint.disarm_all()


def _setup(path: Path, clock: ManualClock) -> tuple[SqliteStore, Lease]:
    store = SqliteStore(path, clock=clock)
    store.plan("download", {"url": "first"})
    lease = store.lease_next("w", ttl=60)
    assert lease is not None
    return store, lease


def _crash(point: str, call: Callable[[], object]) -> None:
    failpoint.arm(point)
    with pytest.raises(failpoint.Crash) as info:
        call()
    assert info.value.name == point


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("op", ["plan", "advance", "fail"])
def test_crash_keeps_exactly_what_was_committed(tmp_path: Path, op: str, point: str) -> None:
    path = tmp_path / "db.sqlite"
    clock = ManualClock()
    crashed, lease = _setup(path, clock)
    calls = {
        "plan": lambda: crashed.plan("download", {"url": "second"}),
        "advance": lambda: crashed.advance(lease, "HEAD_DONE"),
        "fail": lambda: crashed.fail(lease, "boom", delay=5.0),
    }
    _crash(f"{op}.{point}", calls[op])
    # The crashed handle is abandoned, as a dead process's would be; it must not be left
    # holding the write lock (a crash before commit rolls back).
    assert not crashed._connection().in_transaction
    committed = point == "after_commit"
    with SqliteStore(path, clock=clock) as store:
        job = store.job(lease.job_id)
        if op == "plan":
            assert len(store.jobs()) == (2 if committed else 1)
        elif op == "advance":
            assert job.state == ("HEAD_DONE" if committed else "PLANNED")
            assert job.lease is not None
        else:
            assert job.last_error == ("boom" if committed else None)
            assert (job.lease is None) == committed
            assert job.run_at == (clock() + 5.0 if committed else clock())
        # The store is usable right away: nothing was left locked.
        store.plan("download", {"url": "third"})
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    crashed.close()


def test_crash_after_an_effect_start_leaves_it_in_doubt(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    clock = ManualClock()
    crashed, lease = _setup(path, clock)
    _crash("effect.after_start", lambda: crashed.run_effect(lease, "op", lambda ctx: 1 / 0))
    with SqliteStore(path, clock=clock) as store:
        assert [e.status for e in store.effects(lease.job_id)] == ["started"]
        clock.advance(61)
        assert store.reconcile().effects_in_doubt == 1
        fresh = store.lease_next("w2")
        assert fresh is not None
        calls: list[int] = []

        def effect(ctx: EffectContext) -> int:
            calls.append(ctx.token)
            return 7

        assert store.run_effect(fresh, "op", effect) == 7
        assert calls == [fresh.token]
    crashed.close()
