"""Every operation crashed at every failpoint: in-process (raising ``Crash``) for all of
them, and with a real SIGKILL of a child process for a sample. After reopening the file,
the SQLite store holds exactly what the model predicts, and the file is intact."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from impl import failpoint
from impl.sqlite.store import SqliteStore
from model import ManualClock, MemoryStore
from tests.agreement.scenario import (
    CONFIG,
    OPERATIONS,
    START,
    World,
    operation_of,
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
)


def call_scenario(point: str, store: SqliteStore, world: World) -> None:
    # The effect_abort scenario's fn raises by design; its start is then removed.
    with contextlib.suppress(RuntimeError):
        OPERATIONS[operation_of(point)](store, world)


def expected_after_crash(point: str) -> tuple[MemoryStore, list[str]]:
    clock = ManualClock(START)
    model = MemoryStore(clock=clock, config=CONFIG)
    world = setup(model, clock)
    predict(model, world, point)
    return model, [j.job_id for j in model.jobs()]


def check_reopened(path: Path, point: str) -> None:
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    model, ids = expected_after_crash(point)
    clock = ManualClock(START + 2.0)
    with SqliteStore(path, clock=clock, config=CONFIG) as real:
        assert sorted(j.job_id for j in real.jobs()) == sorted(ids)
        assert projection(real, ids) == projection(model, ids)
        assert [w.name for w in real.workflows()] == [w.name for w in model.workflows()]


@pytest.mark.parametrize("point", failpoint.ALL)
def test_crash_at_failpoint_leaves_what_the_model_predicts(point: str, tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    clock = ManualClock(START)
    store = SqliteStore(path, clock=clock, config=CONFIG)
    world = setup(store, clock)
    failpoint.arm(point)
    try:
        with pytest.raises(failpoint.Crash):
            call_scenario(point, store, world)
    finally:
        failpoint.disarm_all()
        store.close()
    check_reopened(path, point)


@pytest.mark.xdist_group("processes")
@pytest.mark.parametrize("point", KILL_SAMPLE)
def test_sigkill_at_failpoint_leaves_what_the_model_predicts(point: str, tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("JOBLEDGER_FAILPOINTS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.agreement.scenario", str(path), point],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -9, (proc.returncode, proc.stderr.decode()[-2000:])
    check_reopened(path, point)
