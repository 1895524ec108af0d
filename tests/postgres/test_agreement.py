"""The PostgreSQL store agrees with the reference model: step by step under Hypothesis
(crashes at failpoints included), and after a crash at every failpoint of the sweep.

One schema serves a whole module and is emptied between examples, because creating a
schema costs far more than a Hypothesis example should; every handle is a separate
store (its own pool), as separate worker processes would have.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import uuid
from collections.abc import Iterator

import attrs
import psycopg
import pytest
from hypothesis import settings
from psycopg import sql

from impl import failpoint
from impl.postgres.store import PostgresStore
from model import Clock, Config, ManualClock, MemoryStore, Store
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
from tests.pg import PG_URL, require_postgres
from tests.postgres import children
from tests.stateful.machine import WORKERS, LedgerMachine, projection

pytestmark = pytest.mark.postgres

_EMPTY = (
    # DELETE, not TRUNCATE: on a handful of rows it is many times faster.
    "DELETE FROM history",
    "DELETE FROM tombstones",
    "DELETE FROM state_counts",
    "DELETE FROM count_pending",
    "UPDATE count_mark SET seq = 0",
    "DELETE FROM effects",
    "DELETE FROM jobs",
    "DELETE FROM workflow_edges WHERE kind <> 'download'",
    "DELETE FROM workflow_states WHERE kind <> 'download'",
    "DELETE FROM workflows WHERE name <> 'download'",
)


@attrs.define
class ClockProxy:
    """A clock the module's long-lived stores read; each example points it at its own."""

    target: Clock = attrs.field(factory=ManualClock)

    def __call__(self) -> float:
        return self.target()


@attrs.define
class Shared:
    """The module's schema, its clock proxy and the open handles, by worker."""

    schema: str
    clock: ClockProxy = attrs.field(factory=ClockProxy)
    handles: dict[str, PostgresStore] = attrs.field(factory=dict)

    def config(self, base: Config) -> Config:
        return attrs.evolve(base, postgres_schema=self.schema)

    def empty(self) -> None:
        with psycopg.connect(PG_URL, autocommit=True) as conn, conn.transaction():
            conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(self.schema)))
            for statement in _EMPTY:
                conn.execute(statement)

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()


_SHARED: list[Shared] = []


@pytest.fixture(scope="module", autouse=True)
def shared_schema() -> Iterator[Shared]:
    """Create the module's schema once (opening a store migrates it), drop it at the end."""
    require_postgres()
    shared = Shared(schema=f"t_{uuid.uuid4().hex[:16]}")
    PostgresStore(PG_URL, config=shared.config(CONFIG)).close()
    _SHARED.append(shared)
    yield shared
    _SHARED.remove(shared)
    shared.close()
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(shared.schema))
        )


class PostgresMachine(LedgerMachine):
    """The ledger machine with PostgreSQL as the subject."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = _SHARED[0]
        self.shared.clock.target = self.clock
        self.shared.empty()
        if not self.shared.handles:
            self.reopen()

    def subject(self, worker: str) -> Store | None:
        return self.shared.handles[worker]

    def supports_crash(self) -> bool:
        return True

    def reopen(self) -> None:
        self.shared.close()
        cfg = self.shared.config(self.config())
        self.shared.handles.update(
            {
                name: PostgresStore(PG_URL, clock=self.shared.clock, config=cfg)
                for name in (*WORKERS, "op")
            }
        )


_DEFAULT = settings()
PostgresMachine.TestCase.settings = settings(
    _DEFAULT,
    # Each step reads the whole projection back over the network: fewer, shorter runs
    # under the default profiles, scaled up with the profile (explore).
    max_examples=max(6, _DEFAULT.max_examples // 10),
    stateful_step_count=25,
)
TestPostgresAgreement = PostgresMachine.TestCase


def expected_after_crash(point: str, then: str | None = None) -> tuple[MemoryStore, list[str]]:
    clock = ManualClock(START)
    model = MemoryStore(clock=clock, config=CONFIG)
    world = setup(model, clock)
    predict(model, world, point, then)
    return model, [j.job_id for j in model.jobs()]


def crash_and_check(
    point: str, shared_schema: Shared, *, then: str | None = None, warm: bool = False
) -> None:
    """Crash the scenario's operation at ``point`` (its ``run_effect`` given ``then``;
    ``warm``: the store knows the workflow beforehand, so an effect's start takes its
    one-statement path from the first call), then check the ledger against the model."""
    shared_schema.empty()
    clock = ManualClock(START)
    cfg = shared_schema.config(CONFIG)
    store = PostgresStore(PG_URL, clock=clock, config=cfg)
    world = setup(store, clock)
    if warm:
        store.workflow("flow")
    failpoint.arm(point)
    try:
        with pytest.raises(failpoint.Crash), contextlib.suppress(RuntimeError):
            operations(then)[operation_of(point)](store, world)
    finally:
        failpoint.disarm_all()
        store.close()
    model, ids = expected_after_crash(point, then)
    with PostgresStore(PG_URL, clock=ManualClock(START + 2.0), config=cfg) as real:
        assert sorted(j.job_id for j in real.jobs()) == sorted(ids)
        assert projection(real, ids) == projection(model, ids)
        assert [w.name for w in real.workflows()] == [w.name for w in model.workflows()]


@pytest.mark.parametrize("point", failpoint.ALL)
def test_crash_at_failpoint_leaves_what_the_model_predicts(
    point: str, shared_schema: Shared
) -> None:
    crash_and_check(point, shared_schema)


THEN_POINTS = tuple(p for p in failpoint.ALL if operation_of(p) in EFFECT_OPERATIONS)


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("point", THEN_POINTS)
def test_crash_at_an_effect_failpoint_with_then_leaves_what_the_model_predicts(
    point: str, warm: bool, shared_schema: Shared
) -> None:
    """``run_effect(then=...)``: a crash before the record's commit leaves neither the
    result nor the move, after it both (the record and the move are one statement on
    the hot path, and one transaction on the general one)."""
    crash_and_check(point, shared_schema, then=THEN, warm=warm)


KILL_SAMPLE = (
    "effect_start.before_commit",
    "effect_start.after_commit",
    "effect_record.before_commit",
    "effect_record.after_commit",
    "effect.after_record",
)


@pytest.mark.xdist_group("processes")
@pytest.mark.parametrize("point", KILL_SAMPLE)
def test_sigkill_at_an_effect_failpoint_with_then_leaves_what_the_model_predicts(
    point: str, shared_schema: Shared
) -> None:
    """A real SIGKILL of a child process in ``run_effect(then=...)``: the server ends its
    session, and the ledger holds what the in-process crash leaves (the one-trip
    record's ``before_commit`` comes before anything is sent)."""
    shared_schema.empty()
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(
        target=children.run_scenario_until_killed,
        args=(PG_URL, shared_schema.schema, point, THEN),
        daemon=True,
    )
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        child.join()
    assert child.exitcode == -signal.SIGKILL
    model, ids = expected_after_crash(point, THEN)
    cfg = shared_schema.config(CONFIG)
    with PostgresStore(PG_URL, clock=ManualClock(START + 2.0), config=cfg) as real:
        assert sorted(j.job_id for j in real.jobs()) == sorted(ids)
        assert projection(real, ids) == projection(model, ids)
