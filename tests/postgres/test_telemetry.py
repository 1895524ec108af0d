"""Telemetry on PostgreSQL: every committed history entry is reported once, in commit
order, and only after its transaction committed.

The listener's record is compared with the ``history`` table read back in id order (the
order the entries were appended), so an entry reported but rolled back, reported twice,
or appended but never reported all fail the comparison. The failpoint sweep crashes each
writing operation at each of its points: a crash at ``before_commit`` must report
nothing of that transaction, a crash at ``after_commit`` everything it committed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import attrs
import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

import impl
from impl import failpoint, telemetry
from impl.postgres.rows import history_event
from model import Config, HistoryEvent, ManualClock, Workflow
from tests.agreement.scenario import CONFIG, OPERATIONS, START, operation_of, setup
from tests.pg import PG_URL
from tests.postgres.conftest import OpenStore

pytestmark = pytest.mark.postgres

FLOW = Workflow(
    name="tel",
    states=["A", "B", "C", "D", "FAILED"],
    # D has two ways in, so advancing to it takes the general path.
    transitions=[("A", "B"), ("B", "C"), ("A", "D"), ("C", "D")],
    initial="A",
    terminal=["D"],
)


@pytest.fixture
def heard() -> Iterator[list[HistoryEvent]]:
    """Every history event reported while the test runs."""
    events: list[HistoryEvent] = []

    def listen(event: telemetry.TelemetryEvent) -> None:
        if isinstance(event, HistoryEvent):
            events.append(event)

    telemetry.add_listener(listen)
    yield events
    telemetry.remove_listener(listen)


def committed(schema: str) -> list[HistoryEvent]:
    """The schema's history table, in the order the entries were appended."""
    with psycopg.connect(PG_URL, row_factory=dict_row) as conn:
        rows = conn.execute(
            sql.SQL("SELECT job_id, at, event, token, worker, detail FROM {} ORDER BY id").format(
                sql.Identifier(schema, "history")
            )
        ).fetchall()
    return [history_event(r) for r in rows]


def ok(ctx: impl.EffectContext) -> impl.JSON:
    """An effect that succeeds."""
    return {"op": ctx.op}


def boom(ctx: impl.EffectContext) -> impl.JSON:
    """An effect that fails, so its start is removed and nothing is reported for it."""
    raise RuntimeError("effect failed")


def test_every_committed_entry_is_reported_once_in_order(
    open_pg: OpenStore, pg_schema: str, heard: list[HistoryEvent]
) -> None:
    clock = ManualClock(START)
    config = Config(postgres_schema=pg_schema, lease_ttl=10.0, max_attempts=2)
    store = open_pg(clock=clock, config=config)
    store.register(FLOW)
    a, b, c = store.plan_many("tel", [{"n": 1}, {"n": 2}, {"n": 3}])
    store.plan("tel", {"n": 1})  # a replay appends nothing
    lease = store.lease_next("w1")
    assert lease is not None
    assert lease.job_id == a
    lease = store.renew(lease, ttl=20.0)
    assert store.run_effect(lease, "e", ok) == {"op": "e"}
    assert store.run_effect(lease, "e", ok) == {"op": "e"}  # a replay appends nothing
    with pytest.raises(RuntimeError):
        store.run_effect(lease, "f", boom)
    assert store.advance(lease, "B") is True
    assert store.advance(lease, "A") is False
    assert store.advance(lease, "C") is True
    assert store.advance(lease, "D") is True  # two ways into D: the general path
    second = store.lease_next("w2", ttl=1.0)
    assert second is not None
    assert second.job_id == b
    store.release(second, delay=0.0)
    second = store.lease_next("w2", ttl=1.0)
    assert second is not None
    store.fail(second, "retry me", delay=0.0)
    clock.advance(0.5)
    dying = store.lease_next("w3", ttl=1.0)
    assert dying is not None
    assert dying.job_id == b
    clock.advance(5.0)  # its lease expires; b has no attempts left
    third = store.lease_next("w4")  # b: EXPIRED then FAILED, then c is leased
    assert third is not None
    assert third.job_id == c
    store.run_effect(third, "g", ok)
    with pytest.raises(impl.EffectResultError):  # not JSON: the start stays, in doubt
        store.run_effect(third, "h", lambda ctx: {1, 2})
    store.run_effect(third, "h", ok)  # retried: in doubt, started again, recorded
    clock.advance(50.0)
    assert store.reconcile().leases_expired == 1
    store.retry(b)
    store.cancel(c, "operator")
    with pytest.raises(impl.LeaseLost):
        store.advance(third, "B")
    assert store.reconcile(dry_run=True) == impl.ReconcileReport(0, 0, 0)
    expected = committed(pg_schema)
    assert heard == expected
    assert {e.event for e in expected} == set(impl.Event)


def test_server_clock_entries_are_reported_as_stored(
    open_pg: OpenStore, pg_schema: str, heard: list[HistoryEvent]
) -> None:
    store = open_pg()
    store.register(FLOW)
    store.plan("tel", {"n": 1})
    lease = store.lease_next("w1")
    assert lease is not None
    store.run_effect(lease, "e", ok)
    store.advance(lease, "B")
    store.release(store.renew(lease))
    assert heard == committed(pg_schema)
    assert len(heard) == 7


@pytest.mark.parametrize("point", failpoint.ALL)
def test_a_crash_reports_exactly_what_was_committed(
    point: str, open_pg: OpenStore, pg_schema: str, heard: list[HistoryEvent]
) -> None:
    clock = ManualClock(START)
    store = open_pg(clock=clock, config=attrs.evolve(CONFIG, postgres_schema=pg_schema))
    world = setup(store, clock)
    before = committed(pg_schema)
    assert heard == before
    heard.clear()
    failpoint.arm(point)
    try:
        with pytest.raises(failpoint.Crash), contextlib.suppress(RuntimeError):
            OPERATIONS[operation_of(point)](store, world)
    finally:
        failpoint.disarm_all()
    after = committed(pg_schema)
    if operation_of(point) == "prune":
        # Prune removes whole jobs' history and writes none: what stays is the history of
        # the jobs that stay, unchanged, and nothing is heard.
        kept = {e.job_id for e in after}
        assert after == [e for e in before if e.job_id in kept]
        assert heard == []
        return
    assert after[: len(before)] == before
    assert heard == after[len(before) :]
    if point.endswith((".before_tx", ".before_commit")) and not point.startswith(
        ("effect_record", "effect_abort")
    ):
        assert heard == []  # the operation's only transaction never committed


def test_then_reports_the_record_and_the_advance_as_committed(
    open_pg: OpenStore, pg_schema: str, heard: list[HistoryEvent]
) -> None:
    """``run_effect(then=...)`` on each of its paths: the one statement that records and
    advances (reported from its own answer), a replay that takes the edge, the general
    record with two ways into ``D``, and a ``then`` refused after the result was
    recorded (the record committed and reported, no move)."""
    clock = ManualClock(START)
    store = open_pg(clock=clock, config=Config(postgres_schema=pg_schema, lease_ttl=10.0))
    store.register(FLOW)
    store.workflow("tel")
    a, b = store.plan_many("tel", [{"n": 1}, {"n": 2}])
    lease = store.lease_next("w1")
    assert lease is not None
    assert store.run_effect(lease, "e", ok, then="B") == {"op": "e"}  # one statement
    assert store.run_effect(lease, "e", ok, then="C") == {"op": "e"}  # replay, moves
    assert store.run_effect(lease, "f", ok, then="D") == {"op": "f"}  # two ways into D
    other = store.lease_next("w2")
    assert other is not None
    assert other.job_id == b

    def moves(ctx: impl.EffectContext) -> impl.JSON:
        assert store.advance(other, "B")
        return None

    with pytest.raises(impl.IllegalTransition):
        store.run_effect(other, "g", moves, then="D")
    assert (store.state(a), store.state(b)) == ("D", "B")
    expected = committed(pg_schema)
    assert heard == expected
    E = impl.Event
    assert [(e.event, e.detail) for e in expected if e.job_id == a] == [
        (E.PLANNED, {}),
        (E.LEASED, {}),
        (E.EFFECT_STARTED, {"op": "e"}),
        (E.EFFECT_RECORDED, {"op": "e"}),
        (E.ADVANCED, {"from": "A", "to": "B"}),
        (E.ADVANCED, {"from": "B", "to": "C"}),
        (E.EFFECT_STARTED, {"op": "f"}),
        (E.EFFECT_RECORDED, {"op": "f"}),
        (E.ADVANCED, {"from": "C", "to": "D"}),
    ]
    assert [e.event for e in expected if e.job_id == b][-3:] == [
        E.EFFECT_STARTED,
        E.ADVANCED,
        E.EFFECT_RECORDED,
    ]
