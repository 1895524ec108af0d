"""A worker's session killed from the server side (``pg_terminate_backend``): the call
that was using it fails with a typed ``StorageError``, the pool reconnects, the next call
works, and no effect result is ever recorded twice. A row lock held past the busy timeout
is ``DatabaseLocked``."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import sql

import impl
from impl.postgres.store import PostgresStore
from model import Config, DatabaseLocked, EffectStatus, Event, ManualClock, StorageError
from tests.pg import PG_URL
from tests.postgres.conftest import OpenStore

pytestmark = pytest.mark.postgres

Admin = psycopg.Connection[tuple[object, ...]]
IDENTITY = {"work_id": "w", "artifact_id": "a", "canonical_url": "u"}


def victim_url() -> tuple[str, str]:
    """A URL whose sessions carry a unique application_name, so the test can find them."""
    name = f"victim_{uuid.uuid4().hex[:12]}"
    return f"{PG_URL}?application_name={name}", name


def kill_sessions(admin: Admin, app: str, *, waiting: bool = False) -> int:
    """Terminate the store's sessions (only those waiting on a lock, if ``waiting``)."""
    query = (
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = %s AND (NOT %s OR wait_event_type = 'Lock')"
    )
    row = admin.execute(query, [app, waiting]).fetchone()
    assert row is not None
    count = row[0]
    assert isinstance(count, int)
    return count


@contextmanager
def row_locked(schema: str, job_id: str) -> Iterator[None]:
    """Hold the job's row lock from another session, so the store's next write waits."""
    with psycopg.connect(PG_URL) as blocker:
        blocker.execute(
            sql.SQL("SELECT 1 FROM {} WHERE job_id = %s FOR UPDATE").format(
                sql.Identifier(schema, "jobs")
            ),
            [job_id],
        )
        yield
        blocker.rollback()


def kill_while_waiting(admin: Admin, app: str, call: Callable[[], object]) -> BaseException:
    """Run ``call`` in a thread, kill its session once it waits on a lock; return the error."""
    caught: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            caught.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 4.0
    while kill_sessions(admin, app, waiting=True) == 0:
        assert time.monotonic() < deadline, "the call never waited on the row lock"
        time.sleep(0.02)
    thread.join(10)
    assert not thread.is_alive()
    assert len(caught) == 1, "the call should have failed"
    return caught[0]


def test_a_session_killed_mid_transaction_is_a_storage_error_and_the_store_recovers(
    open_pg: OpenStore, pg_schema: str, pg_admin: Admin
) -> None:
    url, app = victim_url()
    store = open_pg(clock=ManualClock(), url=url)
    job_id = store.plan("download", IDENTITY)
    lease = store.lease_next("w", ttl=30)
    assert lease is not None
    with row_locked(pg_schema, job_id):
        error = kill_while_waiting(pg_admin, app, lambda: store.renew(lease))
    assert isinstance(error, StorageError)
    assert "connection to PostgreSQL was lost" in str(error)
    assert not isinstance(error.__cause__, impl.JobledgerError)
    # The pool replaced the dead session: the very next call works.
    assert store.renew(lease).token == lease.token
    assert [e.event for e in store.history(job_id)][-1] is Event.RENEWED


def test_idle_sessions_killed_between_calls_are_replaced_transparently(
    open_pg: OpenStore, pg_admin: Admin
) -> None:
    url, app = victim_url()
    store = open_pg(clock=ManualClock(), url=url)
    job_id = store.plan("download", IDENTITY)
    assert kill_sessions(pg_admin, app) >= 1
    lease = store.lease_next("w")
    assert lease is not None
    assert lease.job_id == job_id


def test_a_kill_around_an_effect_never_records_it_twice(
    open_pg: OpenStore, pg_schema: str, pg_admin: Admin
) -> None:
    url, app = victim_url()
    store: PostgresStore = open_pg(clock=ManualClock(), url=url)
    job_id = store.plan("download", IDENTITY)
    lease = store.lease_next("w", ttl=30)
    assert lease is not None
    calls: list[int] = []

    def effect(ctx: impl.EffectContext) -> impl.JSON:
        calls.append(ctx.token)
        # The world changed; now every session of this store dies before the record.
        kill_sessions(pg_admin, app)
        return {"call": len(calls)}

    # Idle sessions killed while fn ran: the record reconnects and succeeds.
    assert store.run_effect(lease, "HEAD", effect) == {"call": 1}

    blockers: list[psycopg.Connection[tuple[object, ...]]] = []

    def locking_effect(ctx: impl.EffectContext) -> impl.JSON:
        calls.append(ctx.token)
        if blockers:
            return {"call": len(calls)}
        # Lock the job row from another session so the record transaction has to wait.
        blocker = psycopg.connect(PG_URL)
        blockers.append(blocker)
        blocker.execute(
            sql.SQL("SELECT 1 FROM {} WHERE job_id = %s FOR UPDATE").format(
                sql.Identifier(pg_schema, "jobs")
            ),
            [job_id],
        )
        return {"call": len(calls)}

    # A session killed inside the record transaction: a typed error, nothing recorded.
    try:
        error = kill_while_waiting(
            pg_admin, app, lambda: store.run_effect(lease, "STREAM", locking_effect)
        )
    finally:
        for blocker in blockers:
            blocker.close()
    assert isinstance(error, StorageError)
    assert [e.status for e in store.effects(job_id)] == [EffectStatus.DONE, EffectStatus.STARTED]
    # Retrying runs STREAM again (its start is in doubt) and records it exactly once.
    assert store.run_effect(lease, "STREAM", locking_effect) == {"call": 3}
    assert store.run_effect(lease, "STREAM", locking_effect) == {"call": 3}
    assert store.run_effect(lease, "HEAD", effect) == {"call": 1}
    assert calls == [1, 1, 1]
    effects = store.effects(job_id)
    assert [(e.op, e.status, e.result) for e in effects] == [
        ("HEAD", EffectStatus.DONE, {"call": 1}),
        ("STREAM", EffectStatus.DONE, {"call": 3}),
    ]
    recorded = [e.detail["op"] for e in store.history(job_id) if e.event is Event.EFFECT_RECORDED]
    assert recorded == ["HEAD", "STREAM"]
    rows = pg_admin.execute(
        sql.SQL("SELECT op, count(*) FROM {} GROUP BY op ORDER BY op").format(
            sql.Identifier(pg_schema, "effects")
        )
    ).fetchall()
    assert rows == [("HEAD", 1), ("STREAM", 1)]


def test_a_row_locked_past_the_busy_timeout_is_database_locked(
    open_pg: OpenStore, pg_schema: str
) -> None:
    store = open_pg(clock=ManualClock(), config=Config(postgres_schema=pg_schema, busy_timeout=0.2))
    job_id = store.plan("download", IDENTITY)
    lease = store.lease_next("w", ttl=30)
    assert lease is not None
    with row_locked(pg_schema, job_id), pytest.raises(DatabaseLocked, match="busy_timeout"):
        store.renew(lease)
    assert store.renew(lease).token == lease.token
