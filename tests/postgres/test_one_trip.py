"""The hot path's transactions in one round trip (``Database.transact``, ``Tx.settle``):
``BEGIN; EXECUTE <prepared statement>; COMMIT`` as one simple query, the ordinary way
when the statement wrote nothing and the body needs more, and the retry rules of a
session lost in the middle of it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import sql

import impl
from impl import failpoint
from impl.postgres import database
from impl.postgres import queries as q
from impl.postgres.database import Tx, _one_trip_stage, _OneTrip
from impl.postgres.store import PostgresStore
from model import Config, DatabaseLocked, Event, LeaseLost, ManualClock, Workflow
from tests.pg import PG_URL
from tests.postgres.conftest import OpenStore
from tests.postgres.test_disconnect import kill_sessions, victim_url

pytestmark = pytest.mark.postgres

Admin = psycopg.Connection[tuple[object, ...]]

FLOW = Workflow(
    name="flow",
    states=["NEW", "DONE"],
    transitions=[("NEW", "DONE")],
    initial="NEW",
    terminal=["DONE"],
)


class Counts:
    """How many transactions went in one trip, and how many the ordinary way."""

    def __init__(self) -> None:
        self.trips: list[str] = []
        self.ordinary = 0


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> Counts:
    seen = Counts()
    trip_execute = _OneTrip.execute
    drive = Tx.drive

    def counted_execute(self: _OneTrip, query: str, *args: object, **kwargs: object) -> object:
        seen.trips.append(query)
        return trip_execute(self, query, *args, **kwargs)  # type: ignore[call-overload]

    def counted_drive(self: Tx, *args: object, **kwargs: object) -> object:
        seen.ordinary += 1
        return drive(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_OneTrip, "execute", counted_execute)
    monkeypatch.setattr(Tx, "drive", counted_drive)
    return seen


def lease_of(store: PostgresStore) -> impl.Lease:
    lease = store.lease_next("w", ttl=30)
    assert lease is not None
    return lease


def test_each_hot_path_transaction_commits_in_one_round_trip(
    open_pg: OpenStore, pg_schema: str, pg_admin: Admin, counts: Counts
) -> None:
    store = open_pg(clock=ManualClock())
    store.register(FLOW)
    job_id = store.plan("flow", {"n": 1})
    counts.trips.clear()
    counts.ordinary = 0

    lease = lease_of(store)
    # Committed when the call returned: another session sees the lease.
    holder = pg_admin.execute(
        sql.SQL("SELECT lease_worker FROM {} WHERE job_id = %s").format(
            sql.Identifier(pg_schema, "jobs")
        ),
        [job_id],
    ).fetchone()
    assert holder == ("w",)
    assert store.run_effect(lease, "op", lambda ctx: {"ok": True}) == {"ok": True}
    assert store.advance(lease, "DONE")

    assert len(counts.trips) == 4  # claim, effect start, effect record, advance
    assert all(
        t.startswith("BEGIN;\nEXECUTE jl_") and t.endswith(";\nCOMMIT") for t in counts.trips
    )
    assert counts.ordinary == 0
    assert store.state(job_id) == "DONE"
    assert [e.event for e in store.history(job_id)] == [
        Event.PLANNED,
        Event.LEASED,
        Event.EFFECT_STARTED,
        Event.EFFECT_RECORDED,
        Event.ADVANCED,
    ]


def test_with_speculation_off_every_transaction_goes_the_ordinary_way(
    open_pg: OpenStore, counts: Counts
) -> None:
    store = open_pg(clock=ManualClock())
    store._db.speculate = False
    store.register(FLOW)
    job_id = store.plan("flow", {"n": 1})
    lease = lease_of(store)
    assert store.run_effect(lease, "op", lambda ctx: 1) == 1
    assert store.advance(lease, "DONE")
    assert counts.trips == []
    assert store.state(job_id) == "DONE"


def test_a_refused_first_statement_runs_again_the_ordinary_way(
    open_pg: OpenStore, counts: Counts
) -> None:
    clock = ManualClock()
    store = open_pg(clock=clock)
    store.register(FLOW)
    job_id = store.plan("flow", {"n": 1})
    lease = lease_of(store)
    before = store.history(job_id)
    counts.trips.clear()
    counts.ordinary = 0
    clock.advance(31)  # the lease expired: the fenced statement changes nothing
    with pytest.raises(LeaseLost):
        store.advance(lease, "DONE")
    assert len(counts.trips) == 1
    assert counts.ordinary == 1  # the general code said why
    assert store.history(job_id) == before
    assert store.state(job_id) == "NEW"


def test_a_claim_that_meets_an_exhausted_job_fails_it_and_claims_the_next(
    open_pg: OpenStore, counts: Counts
) -> None:
    clock = ManualClock()
    store = open_pg(clock=clock)
    store.register(FLOW)
    first = store.plan("flow", {"n": 1}, max_attempts=1)
    second = store.plan("flow", {"n": 2})
    assert lease_of(store).job_id == first
    clock.advance(31)  # its only attempt expired with its lease
    counts.trips.clear()
    counts.ordinary = 0
    lease = lease_of(store)
    assert lease.job_id == second
    assert counts.ordinary == 1  # the one-trip claim found the exhausted job first
    assert store.state(first) == "FAILED"
    assert [e.event for e in store.history(second)] == [Event.PLANNED, Event.LEASED]


def test_a_crash_before_the_commit_of_a_one_trip_transaction_commits_nothing(
    open_pg: OpenStore, counts: Counts
) -> None:
    store = open_pg(clock=ManualClock())
    store.register(FLOW)
    job_id = store.plan("flow", {"n": 1})
    lease = lease_of(store)
    failpoint.arm("advance.before_commit")
    try:
        with pytest.raises(failpoint.Crash):
            store.advance(lease, "DONE")
    finally:
        failpoint.disarm_all()
    assert store.state(job_id) == "NEW"
    assert store.advance(lease, "DONE")
    assert store.state(job_id) == "DONE"


@contextmanager
def row_locked(schema: str, job_id: str) -> Iterator[None]:
    with psycopg.connect(PG_URL) as other:
        other.execute(
            sql.SQL("SELECT 1 FROM {} WHERE job_id = %s FOR UPDATE").format(
                sql.Identifier(schema, "jobs")
            ),
            [job_id],
        )
        yield


def test_a_failed_one_trip_statement_rolls_back_and_the_connection_serves_again(
    open_pg: OpenStore, pg_schema: str, counts: Counts
) -> None:
    store = open_pg(clock=ManualClock(), config=Config(postgres_schema=pg_schema, busy_timeout=0.2))
    store.register(FLOW)
    job_id = store.plan("flow", {"n": 1})
    lease = lease_of(store)
    with row_locked(pg_schema, job_id), pytest.raises(DatabaseLocked):
        store.advance(lease, "DONE")
    assert store.state(job_id) == "NEW"
    assert store.advance(lease, "DONE")
    assert store.state(job_id) == "DONE"


def test_sessions_killed_between_calls_are_replaced_even_unseen_before_the_trip(
    open_pg: OpenStore, pg_admin: Admin, monkeypatch: pytest.MonkeyPatch, counts: Counts
) -> None:
    # Without the look at the idle socket, the trip itself meets the dead session: its
    # first answer is the server's own "terminating connection", so nothing ran.
    monkeypatch.setattr(database, "_readable", lambda conn: False)
    url, app = victim_url()
    store = open_pg(clock=ManualClock(), url=url)
    store.register(FLOW)
    job_id = store.plan("flow", {"n": 1})
    assert kill_sessions(pg_admin, app) >= 1
    deadline = time.monotonic() + 10
    while pg_admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [app]
    ).fetchone() != (0,):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert lease_of(store).job_id == job_id
    assert [e.event for e in store.history(job_id)] == [Event.PLANNED, Event.LEASED]


def test_sessions_killed_between_calls_are_found_before_the_trip(
    open_pg: OpenStore, pg_admin: Admin, counts: Counts
) -> None:
    url, app = victim_url()
    store = open_pg(clock=ManualClock(), url=url)
    store.register(FLOW)
    job_id = store.plan("flow", {"n": 1})
    assert kill_sessions(pg_admin, app) >= 1
    time.sleep(0.2)  # the server's goodbye has arrived on the idle socket
    counts.trips.clear()
    counts.ordinary = 0
    assert lease_of(store).job_id == job_id
    assert counts.trips == []  # the dead session was seen: the ordinary way, re-run
    assert counts.ordinary >= 1


class _Trip:
    def __init__(self, *answers: psycopg.pq.ExecStatus) -> None:
        self.answers = answers


def test_the_stage_of_a_failed_trip_decides_whether_it_may_run_again() -> None:
    status = psycopg.pq.ExecStatus
    ended = psycopg.errors.AdminShutdown("terminating connection")
    cut = psycopg.OperationalError("server closed the connection unexpectedly")
    refused = psycopg.errors.LockNotAvailable("lock timeout")
    stage = _one_trip_stage
    # An error the server answered: the block was aborted, COMMIT did nothing.
    assert stage(refused, _Trip(status.COMMAND_OK, status.FATAL_ERROR)) == "body"  # type: ignore[arg-type]
    # The server ended the session before BEGIN: nothing ran, run it again.
    assert stage(ended, _Trip(status.FATAL_ERROR)) == "begin"  # type: ignore[arg-type]
    assert database.retryable(ended, "begin")
    # Ended after BEGIN, or cut with no answer at all: COMMIT may have run.
    assert stage(ended, _Trip(status.COMMAND_OK, status.FATAL_ERROR)) == "commit"  # type: ignore[arg-type]
    assert stage(cut, _Trip()) == "commit"  # type: ignore[arg-type]
    assert stage(cut, None) == "commit"
    assert not database.retryable(cut, "commit")


def test_a_prepared_one_trip_numbers_each_parameter_once() -> None:
    plan = q.prepared("SELECT %(a)s, %(b)s, %(a)s")
    assert plan.prepare == f"PREPARE {plan.name} AS SELECT $1, $2, $1"
    assert plan.one_trip == f"BEGIN;\nEXECUTE {plan.name}(%(a)s, %(b)s);\nCOMMIT"
    assert q.prepared("SELECT %(a)s, %(b)s, %(a)s") == plan
    assert q.prepared("SELECT %(b)s").name != plan.name


CHAIN = Workflow(
    name="chain",
    states=["NEW", "MID", "DONE", "FAILED"],
    transitions=[("NEW", "MID"), ("MID", "DONE")],
    initial="NEW",
    terminal=["DONE"],
)
DIAMOND = Workflow(
    name="diamond",
    states=["NEW", "MID", "DONE", "FAILED"],
    transitions=[("NEW", "MID"), ("MID", "DONE"), ("NEW", "DONE")],
    initial="NEW",
    terminal=["DONE"],
)
"""``DONE`` has two sources: no one statement can know the edge's ``from``."""


def test_run_effect_with_then_records_and_advances_in_one_round_trip(
    open_pg: OpenStore, counts: Counts
) -> None:
    """The point of ``then``: the effect's start and its record with the advance are
    two round trips, where ``run_effect`` and ``advance`` take three."""
    store = open_pg(clock=ManualClock())
    store.register(FLOW)
    store.workflow("flow")  # known to the store, as a Worker's store knows its kinds
    job_id = store.plan("flow", {"n": 1})
    lease = lease_of(store)
    counts.trips.clear()
    counts.ordinary = 0
    assert store.run_effect(lease, "op", lambda ctx: {"ok": True}, then="DONE") == {"ok": True}
    assert len(counts.trips) == 2  # effect start, effect record with the advance
    assert counts.ordinary == 0
    info = store.job(job_id)
    assert (info.state, info.lease) == ("DONE", None)
    history = store.history(job_id)
    assert [e.event for e in history] == [
        Event.PLANNED,
        Event.LEASED,
        Event.EFFECT_STARTED,
        Event.EFFECT_RECORDED,
        Event.ADVANCED,
    ]
    recorded, advanced = history[-2:]
    assert advanced.detail == {"from": "NEW", "to": "DONE"}
    assert (advanced.token, advanced.worker) == (lease.token, "w")
    assert recorded.at == advanced.at == store.effects(job_id)[0].finished_at


def test_a_then_from_the_wrong_state_is_refused_by_the_start_statement(
    open_pg: OpenStore, counts: Counts
) -> None:
    """The one-statement start takes ``then``'s check into its ``WHERE``: a job in a
    state from which ``advance`` would refuse ``then`` gets no start, and the general
    code says why, having written nothing."""
    store = open_pg(clock=ManualClock())
    store.register(CHAIN)
    store.workflow("chain")
    job_id = store.plan("chain", {"n": 1})
    lease = lease_of(store)
    before = (store.job(job_id), store.history(job_id))
    counts.trips.clear()
    counts.ordinary = 0
    with pytest.raises(impl.IllegalTransition, match="'NEW' to 'DONE'"):
        store.run_effect(lease, "op", lambda ctx: 1, then="DONE")
    assert (len(counts.trips), counts.ordinary) == (1, 1)
    assert (store.job(job_id), store.history(job_id)) == before
    assert store.effects(job_id) == []


def test_a_then_with_two_sources_records_the_ordinary_way(
    open_pg: OpenStore, counts: Counts
) -> None:
    store = open_pg(clock=ManualClock())
    store.register(DIAMOND)
    store.workflow("diamond")
    job_id = store.plan("diamond", {"n": 1})
    lease = lease_of(store)
    counts.trips.clear()
    counts.ordinary = 0
    assert store.run_effect(lease, "op", lambda ctx: 2, then="DONE") == 2
    assert (len(counts.trips), counts.ordinary) == (1, 1)  # the start; the record
    assert store.state(job_id) == "DONE"
    assert [e.event for e in store.history(job_id)][-2:] == [
        Event.EFFECT_RECORDED,
        Event.ADVANCED,
    ]
    assert store.history(job_id)[-1].detail == {"from": "NEW", "to": "DONE"}


def test_a_then_record_on_the_servers_clock_keeps_one_time(open_pg: OpenStore) -> None:
    """Without an injected clock the statement's two history entries and the result
    carry the server's one transaction time."""
    store = open_pg()
    store.register(FLOW)
    store.workflow("flow")
    job_id = store.plan("flow", {"n": 1})
    lease = lease_of(store)
    assert store.run_effect(lease, "op", lambda ctx: None, then="DONE") is None
    recorded, advanced = store.history(job_id)[-2:]
    assert (recorded.event, advanced.event) == (Event.EFFECT_RECORDED, Event.ADVANCED)
    assert recorded.at == advanced.at == store.effects(job_id)[0].finished_at
    assert store.job(job_id).lease is None


@pytest.mark.parametrize("where", ["before_commit", "after_commit"])
@pytest.mark.parametrize("flow", [FLOW, DIAMOND], ids=["one-statement", "general"])
def test_a_crash_at_the_commit_of_a_then_record_keeps_both_or_neither(
    open_pg: OpenStore, flow: Workflow, where: str
) -> None:
    """The record and ``then``'s move commit together, on the one-statement path and on
    the general one (two ways into ``DONE``): a crash before the commit leaves the
    start alone, after it the result and the move."""
    store = open_pg(clock=ManualClock())
    store.register(flow)
    store.workflow(flow.name)
    job_id = store.plan(flow.name, {"n": 1})
    lease = lease_of(store)
    failpoint.arm(f"effect_record.{where}")
    try:
        with pytest.raises(failpoint.Crash):
            store.run_effect(lease, "op", lambda ctx: 3, then="DONE")
    finally:
        failpoint.disarm_all()
    (effect,) = store.effects(job_id)
    if where == "before_commit":
        assert (store.state(job_id), effect.status) == ("NEW", impl.EffectStatus.STARTED)
        assert store.run_effect(lease, "op", lambda ctx: 3, then="DONE") == 3  # finishes
    else:
        assert (store.state(job_id), effect.status, effect.result) == (
            "DONE",
            impl.EffectStatus.DONE,
            3,
        )
    info = store.job(job_id)
    assert (info.state, info.lease) == ("DONE", None)
