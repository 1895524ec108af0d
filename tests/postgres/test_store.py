"""The PostgreSQL backend on its own: lifecycle, the database-side state machine,
migrations, and the one clock rule (server time when no clock is injected)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import psycopg
import pytest
from psycopg import sql

import impl
from impl.postgres import schema as pg_schema_mod
from impl.postgres.database import Tx, read_schema_version
from impl.postgres.schema import SCHEMA_VERSION
from impl.postgres.store import PostgresStore
from model import Config, Event, ManualClock, SchemaVersionError, StorageError, Workflow
from tests.pg import PG_URL
from tests.postgres.conftest import OpenStore

pytestmark = pytest.mark.postgres

T = TypeVar("T")

Admin = psycopg.Connection[tuple[object, ...]]

FLOW = Workflow(
    name="flow",
    states=["NEW", "MID", "DONE"],
    transitions=[("NEW", "MID"), ("MID", "DONE")],
    initial="NEW",
    terminal=["DONE"],
)


def table(schema: str, name: str) -> sql.Composed:
    return sql.SQL("{}").format(sql.Identifier(schema, name))


def test_a_job_runs_from_plan_to_terminal_with_its_history(open_pg: OpenStore) -> None:
    clock = ManualClock()
    store = open_pg(clock=clock)
    store.register(FLOW)
    job_id = store.plan("flow", {"n": 1}, payload={"p": 1})
    assert store.plan("flow", {"n": 1}, payload={"p": 1}) == job_id
    lease = store.lease_next("w1", ttl=10)
    assert lease is not None
    assert (lease.job_id, lease.token, lease.attempt, lease.payload) == (job_id, 1, 1, {"p": 1})
    assert store.lease_next("w2") is None
    assert store.advance(lease, "MID")
    calls: list[int] = []

    def effect(ctx: impl.EffectContext) -> impl.JSON:
        calls.append(ctx.token)
        return {"n": len(calls)}

    assert store.run_effect(lease, "op", effect) == {"n": 1}
    assert store.run_effect(lease, "op", effect) == {"n": 1}
    assert calls == [1]
    assert store.advance(lease, "DONE")
    info = store.job(job_id)
    assert (info.state, info.lease, info.attempts) == ("DONE", None, 1)
    assert [e.event for e in store.history(job_id)] == [
        Event.PLANNED,
        Event.LEASED,
        Event.ADVANCED,
        Event.EFFECT_STARTED,
        Event.EFFECT_RECORDED,
        Event.ADVANCED,
    ]
    assert store.stats().by_state["flow"] == {"NEW": 0, "MID": 0, "DONE": 1, "FAILED": 0}


def test_a_second_store_on_the_same_schema_knows_registered_workflows(
    open_pg: OpenStore,
) -> None:
    first = open_pg(clock=ManualClock())
    first.register(FLOW)
    second = open_pg(clock=ManualClock())
    assert second.workflow("flow") == FLOW
    assert [w.name for w in second.workflows()] == ["download", "flow"]


def test_open_store_opens_postgres_urls(pg_schema: str) -> None:
    store = impl.open_store(PG_URL, config=Config(postgres_schema=pg_schema))
    assert isinstance(store, PostgresStore)
    with store:
        assert store.workflow("download") == impl.DOWNLOAD
    with pytest.raises(StorageError, match="closed"):
        store.stats()


def test_the_trigger_rejects_an_undeclared_edge_by_raw_sql(
    open_pg: OpenStore, pg_schema: str, pg_admin: Admin
) -> None:
    store = open_pg(clock=ManualClock())
    store.register(FLOW)
    job_id = store.plan("flow", {"n": 1})
    jobs = table(pg_schema, "jobs")
    update = sql.SQL("UPDATE {} SET state = %s WHERE job_id = %s").format(jobs)
    with pytest.raises(psycopg.Error) as info:
        pg_admin.execute(update, ["DONE", job_id])
    assert info.value.sqlstate == pg_schema_mod.ILLEGAL_EDGE_SQLSTATE
    with pytest.raises(psycopg.Error) as info:
        pg_admin.execute(update, ["NOWHERE", job_id])
    assert info.value.sqlstate == pg_schema_mod.ILLEGAL_EDGE_SQLSTATE
    # A declared edge passes, and so does entering the failed state from a live state.
    pg_admin.execute(update, ["MID", job_id])
    pg_admin.execute(
        sql.SQL("UPDATE {} SET state = 'FAILED', failed_from = state WHERE job_id = %s").format(
            jobs
        ),
        [job_id],
    )
    # Leaving the failed state needs a higher token (the operator's retry) ...
    with pytest.raises(psycopg.Error) as info:
        pg_admin.execute(update, ["MID", job_id])
    assert info.value.sqlstate == pg_schema_mod.ILLEGAL_EDGE_SQLSTATE
    pg_admin.execute(
        sql.SQL("UPDATE {} SET state = 'MID', token = token + 1 WHERE job_id = %s").format(jobs),
        [job_id],
    )
    # ... and a token never goes back.
    with pytest.raises(psycopg.Error) as info:
        pg_admin.execute(
            sql.SQL("UPDATE {} SET token = 0 WHERE job_id = %s").format(jobs), [job_id]
        )
    assert info.value.sqlstate == pg_schema_mod.FENCE_BACKWARDS_SQLSTATE
    assert store.state(job_id) == "MID"


def test_migrations_are_idempotent(open_pg: OpenStore, pg_schema: str, pg_admin: Admin) -> None:
    open_pg(clock=ManualClock()).close()
    open_pg(clock=ManualClock()).close()
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        assert pg_schema_mod.migrate(conn, pg_schema) == SCHEMA_VERSION
        assert pg_schema_mod.recorded_version(conn, pg_schema) == SCHEMA_VERSION
    rows = pg_admin.execute(
        sql.SQL("SELECT version FROM {} ORDER BY version").format(
            table(pg_schema, "schema_migrations")
        )
    ).fetchall()
    assert [r[0] for r in rows] == [m.version for m in pg_schema_mod.MIGRATIONS]


def test_the_schema_version_can_be_read_without_migrating(
    open_pg: OpenStore, pg_schema: str
) -> None:
    assert read_schema_version(PG_URL, pg_schema) == 0
    open_pg(clock=ManualClock()).close()
    assert read_schema_version(PG_URL, pg_schema) == SCHEMA_VERSION
    assert pg_schema_mod.pending(read_schema_version(PG_URL, pg_schema)) == []


def test_a_newer_schema_is_refused(open_pg: OpenStore, pg_schema: str, pg_admin: Admin) -> None:
    open_pg(clock=ManualClock()).close()
    pg_admin.execute(
        sql.SQL("INSERT INTO {} (version, name) VALUES (%s, 'from the future')").format(
            table(pg_schema, "schema_migrations")
        ),
        [SCHEMA_VERSION + 1],
    )
    with pytest.raises(SchemaVersionError, match=f"version {SCHEMA_VERSION + 1}"):
        open_pg(clock=ManualClock())


def test_an_unreachable_server_is_a_storage_error(pg_schema: str) -> None:
    with pytest.raises(StorageError, match=r"127\.0\.0\.1:1/test"):
        PostgresStore(
            "postgresql://postgres@127.0.0.1:1/test", config=Config(postgres_schema=pg_schema)
        )


def server_now(admin: Admin) -> float:
    row = admin.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
    assert row is not None
    return float(row[0])  # type: ignore[arg-type]


def test_without_a_clock_lease_times_come_from_the_server(
    open_pg: OpenStore, pg_admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose own clock is an hour ahead still agrees with the server."""
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600.0)
    store = open_pg(clock=None)
    job_id = store.plan("download", {"work_id": "w", "artifact_id": "a", "canonical_url": "u"})
    before = server_now(pg_admin)
    lease = store.lease_next("skewed", ttl=0.5)
    after = server_now(pg_admin)
    assert lease is not None
    assert before + 0.5 <= lease.expires_at <= after + 0.5
    assert abs(store.now() - server_now(pg_admin)) < 2.0
    assert store.job(job_id).run_at <= before
    assert store.lease_next("other", ttl=0.5) is None
    while server_now(pg_admin) < lease.expires_at:
        time.sleep(0.05)
    again = store.lease_next("other", ttl=5)
    assert again is not None
    assert (again.job_id, again.token) == (job_id, 2)
    with pytest.raises(impl.LeaseLost):
        store.renew(lease)


def test_a_workflow_read_once_is_answered_without_a_transaction(
    open_pg: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    open_pg().register(FLOW)
    store = open_pg()  # a fresh handle: nothing cached yet
    reads: list[str] = []
    real_read = store._db.read

    def counted(what: str, body: Callable[[Tx], T]) -> T:
        reads.append(what)
        return real_read(what, body)

    monkeypatch.setattr(store._db, "read", counted)
    assert store.workflow("flow") == FLOW
    assert store.workflow("flow") == FLOW
    assert reads == ["workflow"]
    store.close()
    with pytest.raises(StorageError, match="closed"):
        store.workflow("flow")


def test_a_version_2_schema_gains_the_breakers_table_and_keeps_its_rows(
    open_pg: OpenStore, pg_schema: str, pg_admin: Admin
) -> None:
    """Version 3 adds the breakers table: a schema left by version 2 (its tombstones
    here) keeps its rows, and records and lists breakers after the upgrade."""
    assert [m.version for m in pg_schema_mod.MIGRATIONS[:2]] == [1, 2]
    with psycopg.connect(PG_URL, autocommit=True) as conn, conn.transaction():
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(pg_schema)))
        pg_schema_mod.set_search_path(conn, pg_schema, local=True)
        conn.execute(pg_schema_mod._LEDGER_TABLE)
        for step in pg_schema_mod.MIGRATIONS[:2]:
            for statement in step.statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                [step.version, step.name],
            )
        conn.execute(
            "INSERT INTO tombstones VALUES (%s, 'download', 'INDEXED', 5.0, 6.0)", ["2" * 64]
        )
    assert read_schema_version(PG_URL, pg_schema) == 2
    store = open_pg(clock=ManualClock(20.0))
    assert read_schema_version(PG_URL, pg_schema) == SCHEMA_VERSION == 3
    assert store.breakers() == []
    store.record_breaker("h:80", worker="w", state="open", failures=3, cooldown=30.0)
    (row,) = store.breakers()
    assert (row.host, row.opened_at, row.until) == ("h:80", 20.0, 50.0)
    kept = pg_admin.execute(sql.SQL("SELECT job_id FROM {}").format(table(pg_schema, "tombstones")))
    assert kept.fetchall() == [("2" * 64,)]


def test_store_sessions_compile_no_statement_with_jit(open_pg: OpenStore) -> None:
    # At ten million jobs the planner priced the pending count of stats past the JIT
    # threshold and the server spent 590 ms compiling a statement that ran in 160 ms.
    store = open_pg()
    for _ in range(2):  # each transaction may take another pooled connection
        row = store._db.read("stats", lambda tx: tx.one("SELECT current_setting('jit') AS jit"))
        assert row is not None
        assert row["jit"] == "off"
