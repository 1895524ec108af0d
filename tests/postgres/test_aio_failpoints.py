"""The failpoint sweep through the async face on PostgreSQL: every operation crashed at
every failpoint, the hot path's on psycopg's async connections (impl.aio.native), the
rest on the store's threads. After reopening, the ledger holds exactly what the model
predicts, as after the same crash of the sync store (tests/postgres/test_agreement.py)."""

from __future__ import annotations

import contextlib

import attrs
import pytest

from impl import failpoint
from impl.aio.store import POSTGRES_THREADS, AsyncStore
from impl.postgres.store import PostgresStore
from model import Config, ManualClock, MemoryStore, Store
from tests.agreement.scenario import (
    CONFIG,
    EFFECT_OPERATIONS,
    START,
    THEN,
    operation_of,
    operations,
    predict,
    setup,
)
from tests.aiosync import LoopThread, SyncFace
from tests.pg import PG_URL, postgres_factory, require_postgres
from tests.stateful.machine import projection

pytestmark = pytest.mark.postgres


def expected_after_crash(point: str, then: str | None = None) -> tuple[MemoryStore, list[str]]:
    clock = ManualClock(START)
    model = MemoryStore(clock=clock, config=CONFIG)
    world = setup(model, clock)
    predict(model, world, point, then)
    return model, [j.job_id for j in model.jobs()]


@pytest.mark.parametrize("point", failpoint.ALL)
def test_crash_at_failpoint_through_the_async_face(point: str) -> None:
    crash_and_check(point)


@pytest.mark.parametrize(
    "point", [p for p in failpoint.ALL if operation_of(p) in EFFECT_OPERATIONS]
)
def test_crash_at_an_effect_failpoint_with_then_through_the_async_face(point: str) -> None:
    """``run_effect(then=...)`` on the native path: a crash before the record's commit
    leaves neither the result nor the move, after it both."""
    crash_and_check(point, then=THEN)


def crash_and_check(point: str, then: str | None = None) -> None:
    """Crash the scenario's operation at ``point`` through the async face (its
    ``run_effect`` given ``then``), then check the ledger against the model."""
    require_postgres()
    clock = ManualClock(START)
    make, _ = postgres_factory(clock)
    opened: list[Store] = []

    def open_sync() -> Store:
        opened.append(make(config=CONFIG))
        return opened[-1]

    loop = LoopThread()
    try:
        face = SyncFace(AsyncStore(open_sync, threads=POSTGRES_THREADS), loop)  # type: ignore[arg-type]
        try:
            assert face.astore.native
            world = setup(face, clock)
            failpoint.arm(point)
            try:
                with pytest.raises(failpoint.Crash), contextlib.suppress(RuntimeError):
                    operations(then)[operation_of(point)](face, world)
            finally:
                failpoint.disarm_all()
        finally:
            face.close()
    finally:
        blocked = loop.close()
    assert not blocked, f"the async face blocked its event loop: {blocked}"
    model, ids = expected_after_crash(point, then)
    config: Config = attrs.evolve(CONFIG, postgres_schema=opened[0].config.postgres_schema)
    with PostgresStore(PG_URL, clock=ManualClock(START + 2.0), config=config) as real:
        assert sorted(j.job_id for j in real.jobs()) == sorted(ids)
        assert projection(real, ids) == projection(model, ids)
        assert [w.name for w in real.workflows()] == [w.name for w in model.workflows()]
