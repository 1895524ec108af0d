"""Every operation crashed at every failpoint: in-process (raising ``Crash``) for all of
them, and with a real SIGKILL of a child process for a sample. After reopening the file,
the SQLite store holds exactly what the model predicts, and the file is intact."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from impl import failpoint
from impl.ledgerthread import LedgerThread, threaded
from impl.sqlite.store import SqliteStore
from model import Config, ManualClock, MemoryStore
from tests.agreement.scenario import (
    CONFIG,
    EFFECT_OPERATIONS,
    FLOW,
    GROUPED,
    START,
    THEN,
    World,
    operation_of,
    operations,
    predict,
    setup,
)
from tests.stateful.machine import projection

ROOT = Path(__file__).resolve().parents[2]
KILL_SAMPLE = (
    "lease_next.before_commit",
    "advance.after_commit",
    "fail.before_commit",
    "effect.after_start",
    "effect.before_record",
    "effect_record.before_commit",
    "effect.after_record",
    "reconcile.after_commit",
    *failpoint.WRITERS_POINTS,
)


def call_scenario(point: str, store: SqliteStore, world: World, then: str | None) -> None:
    # The effect_abort scenario's fn raises by design; its start is then removed.
    with contextlib.suppress(RuntimeError):
        operations(then)[operation_of(point)](store, world)


def expected_after_crash(point: str, then: str | None) -> tuple[MemoryStore, list[str]]:
    clock = ManualClock(START)
    model = MemoryStore(clock=clock, config=CONFIG)
    world = setup(model, clock)
    predict(model, world, point, then)
    return model, [j.job_id for j in model.jobs()]


def check_reopened(path: Path, point: str, then: str | None = None) -> None:
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    model, ids = expected_after_crash(point, then)
    clock = ManualClock(START + 2.0)
    with SqliteStore(path, clock=clock, config=CONFIG) as real:
        assert sorted(j.job_id for j in real.jobs()) == sorted(ids)
        assert projection(real, ids) == projection(model, ids)
        assert [w.name for w in real.workflows()] == [w.name for w in model.workflows()]


def _crash_and_check(
    point: str,
    tmp_path: Path,
    config: Config,
    through: Callable[[SqliteStore], tuple[object, Callable[[], None]]] | None = None,
    then: str | None = None,
) -> None:
    """Crash the scenario's operation at ``point`` (on the store, or on what ``through``
    makes of it, with its closer), then check the reopened file against the model."""
    path = tmp_path / "jobs.sqlite"
    clock = ManualClock(START)
    store = SqliteStore(path, clock=clock, config=config)
    world = setup(store, clock)
    target, close = through(store) if through is not None else (store, lambda: None)
    failpoint.arm(point)
    try:
        with pytest.raises(failpoint.Crash):
            call_scenario(point, target, world, then)  # type: ignore[arg-type]
    finally:
        failpoint.disarm_all()
        close()
        store.close()
    check_reopened(path, point, then)


@pytest.mark.parametrize("point", failpoint.ALL)
def test_crash_at_failpoint_leaves_what_the_model_predicts(point: str, tmp_path: Path) -> None:
    _crash_and_check(point, tmp_path, CONFIG)


@pytest.mark.parametrize("point", failpoint.WRITERS_POINTS)
def test_crash_holding_the_writers_queue_leaves_what_the_model_predicts_and_frees_it(
    point: str, tmp_path: Path
) -> None:
    """A crash while holding the writers' queue (impl.sqlite.writers) leaves nothing of
    the call, and the queue free: the next writer does not wait for it."""
    _crash_and_check(point, tmp_path, CONFIG)
    with SqliteStore(tmp_path / "jobs.sqlite", config=Config(busy_timeout=0.5)) as store:
        store.plan("flow", {"n": 200})


# group.in_savepoint is hit only by a member that joined another's group, which a
# sequential scenario never makes: tests/sqlite/test_group.py crashes there.
GROUP_SEQUENTIAL = tuple(p for p in failpoint.GROUP_POINTS if p != "group.in_savepoint")


@pytest.mark.parametrize("point", failpoint.ALL + GROUP_SEQUENTIAL)
def test_crash_at_failpoint_in_a_grouped_store_leaves_what_the_model_predicts(
    point: str, tmp_path: Path
) -> None:
    """The same sweep on a store that groups its commits: every operation's transaction
    is then a member of a group, and crashes around the group's own COMMIT too."""
    _crash_and_check(point, tmp_path, GROUPED)


@pytest.mark.parametrize("point", failpoint.ALL + failpoint.LEDGER_THREAD_POINTS)
def test_crash_at_failpoint_through_a_ledger_thread_leaves_what_the_model_predicts(
    point: str, tmp_path: Path
) -> None:
    """The same sweep with the final call made on a worker's ledger thread
    (impl.ledgerthread): every operation's failpoints are then hit on that thread, and the
    crash reaches the caller; and crashes before and after the call it makes."""

    _crash_and_check(point, tmp_path, CONFIG, _through_ledger_thread)


def _through_ledger_thread(store: SqliteStore) -> tuple[object, Callable[[], None]]:
    thread = LedgerThread()
    return threaded(store, thread), thread.close


EFFECT_POINTS = tuple(p for p in failpoint.ALL if operation_of(p) in EFFECT_OPERATIONS)


@pytest.mark.parametrize("mode", ["plain", "grouped", "ledger"])
@pytest.mark.parametrize("point", EFFECT_POINTS)
def test_crash_at_an_effect_failpoint_with_then_leaves_what_the_model_predicts(
    point: str, mode: str, tmp_path: Path
) -> None:
    """``run_effect(then=...)``: the result transaction carries the advance, so a crash
    before its commit leaves neither the result nor the move, and after it both; on the
    plain, the grouped and the ledger-thread path."""
    _crash_and_check(
        point,
        tmp_path,
        GROUPED if mode == "grouped" else CONFIG,
        _through_ledger_thread if mode == "ledger" else None,
        then=THEN,
    )


GROUP_KILL_SAMPLE = ("group.before_commit", "group.after_commit", "effect.after_start")
LEDGER_KILL_SAMPLE = (*failpoint.LEDGER_THREAD_POINTS, "effect.after_start", "effect.after_record")
THEN_KILL_SAMPLE = (
    "effect_record.before_commit",
    "effect_record.after_commit",
    "effect.after_record",
)


@pytest.mark.xdist_group("processes")
@pytest.mark.parametrize(
    ("point", "mode"),
    [(p, "") for p in KILL_SAMPLE]
    + [(p, "grouped") for p in GROUP_KILL_SAMPLE]
    + [(p, "ledger") for p in LEDGER_KILL_SAMPLE]
    + [(p, "then") for p in THEN_KILL_SAMPLE],
)
def test_sigkill_at_failpoint_leaves_what_the_model_predicts(
    point: str, mode: str, tmp_path: Path
) -> None:
    path = tmp_path / "jobs.sqlite"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("JOBLEDGER_FAILPOINTS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.agreement.scenario", str(path), point]
        + ([mode] if mode else []),
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -9, (proc.returncode, proc.stderr.decode()[-2000:])
    check_reopened(path, point, THEN if mode == "then" else None)
    if point in failpoint.WRITERS_POINTS:
        # The child died holding the queue: the next writer takes it over at once.
        with SqliteStore(path, config=Config(busy_timeout=0.5)) as store:
            store.plan("flow", {"n": 200})


PRUNE_BATCH_POINTS = (
    "prune.before_tx",
    "prune.after_archive",
    "prune.before_commit",
    "prune.after_commit",
)


@pytest.mark.parametrize("hit", [1, 2, 3])
@pytest.mark.parametrize("point", PRUNE_BATCH_POINTS)
def test_a_crash_in_a_prune_batch_keeps_exactly_the_batches_before(
    point: str, hit: int, tmp_path: Path
) -> None:
    """Five finished jobs, batches of two: a crash in the ``hit``-th batch leaves the
    batches before it pruned (and that one too if the crash came after its commit), and
    nothing else, exactly as the model prunes with that many jobs as its limit."""
    path = tmp_path / "jobs.sqlite"
    clock = ManualClock(START)
    model = MemoryStore(clock=clock, config=CONFIG)
    store = SqliteStore(path, clock=clock, config=CONFIG)
    for s in (model, store):
        s.register(FLOW)
    ids = store.plan_many("flow", [{"p": n} for n in range(5)])
    assert model.plan_many("flow", [{"p": n} for n in range(5)]) == ids
    for s in (model, store):
        for _ in ids:
            lease = s.lease_next("w")
            assert lease is not None
            s.advance(lease, "B")
            s.advance(lease, "C")
    clock.advance(1.0)
    failpoint.arm(point, on_hit=hit)
    try:
        with pytest.raises(failpoint.Crash):
            store.prune(finished_before=clock(), batch_size=2, archive=lambda jobs: None)
    finally:
        failpoint.disarm_all()
        store.close()
    done = hit if point == "prune.after_commit" else hit - 1
    model.prune(finished_before=clock(), batch_size=2, limit=done * 2)
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with SqliteStore(path, clock=clock, config=CONFIG) as real:
        assert [j.job_id for j in real.jobs()] == [j.job_id for j in model.jobs()]
        assert projection(real, ids) == projection(model, ids)
