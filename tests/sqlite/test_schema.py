"""The SQLite schema: migrations, the state-machine trigger, and what survives a reopen."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from impl.sqlite.schema import MIGRATIONS, SCHEMA_VERSION
from impl.sqlite.store import SqliteStore
from model import (
    DOWNLOAD,
    EffectStatus,
    Event,
    IllegalTransition,
    ManualClock,
    SchemaVersionError,
    Workflow,
)
from model.key import canon, job_key

FLOW = Workflow(
    name="flow",
    states=["A", "B", "C"],
    transitions=[("A", "B"), ("B", "C")],
    initial="A",
    terminal=["C"],
)


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def test_each_migration_is_recorded_once(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    SqliteStore(path).close()
    SqliteStore(path).close()
    conn = _raw(path)
    try:
        rows = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version")
        assert [tuple(r) for r in rows] == [(m.version, m.name) for m in MIGRATIONS]
    finally:
        conn.close()


def test_trigger_rejects_an_undeclared_edge_written_by_raw_sql(tmp_path: Path) -> None:
    """The database itself refuses a state change the workflow does not declare."""
    path = tmp_path / "db.sqlite"
    with SqliteStore(path) as store:
        job_id = store.plan("download", {"url": "u"})
    conn = _raw(path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="illegal state transition"):
            conn.execute("UPDATE jobs SET state = 'FINALIZED' WHERE job_id = ?", (job_id,))
        assert conn.execute("SELECT state FROM jobs").fetchone()[0] == "PLANNED"
        # A declared edge passes, so the trigger is selective, not a blanket refusal.
        conn.execute("UPDATE jobs SET state = 'HEAD_DONE' WHERE job_id = ?", (job_id,))
        with pytest.raises(sqlite3.IntegrityError, match="illegal state transition"):
            conn.execute("UPDATE jobs SET state = 'PLANNED' WHERE job_id = ?", (job_id,))
        # Out of the failed state only as an operator retry: back to failed_from, new token.
        conn.execute(
            "UPDATE jobs SET state = 'FAILED', terminal = 1, failed_from = state WHERE job_id = ?",
            (job_id,),
        )
        with pytest.raises(sqlite3.IntegrityError, match="illegal state transition"):
            conn.execute(
                "UPDATE jobs SET state = 'HEAD_DONE', terminal = 0 WHERE job_id = ?", (job_id,)
            )
        conn.execute(
            "UPDATE jobs SET state = 'HEAD_DONE', terminal = 0, token = token + 1 WHERE job_id = ?",
            (job_id,),
        )
        with pytest.raises(sqlite3.IntegrityError, match="never decreases"):
            conn.execute("UPDATE jobs SET token = 0 WHERE job_id = ?", (job_id,))
    finally:
        conn.close()


def test_trigger_errors_surface_as_illegal_transition(tmp_path: Path) -> None:
    """Were the store's own checks ever bypassed, the trigger's refusal is still typed."""
    from impl.sqlite.connection import translated

    with SqliteStore(tmp_path / "db.sqlite") as store:
        job_id = store.plan("download", {"url": "u"})
        conn = store._connection()
        with pytest.raises(IllegalTransition), translated("test"):
            conn.execute("UPDATE jobs SET state = 'INDEXED' WHERE job_id = ?", (job_id,))


def test_newer_schema_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    SqliteStore(path).close()
    conn = _raw(path)
    conn.execute(
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, 'future', 0)",
        (SCHEMA_VERSION + 1,),
    )
    conn.close()
    before = path.read_bytes()
    with pytest.raises(SchemaVersionError, match="upgrade jobledger"):
        SqliteStore(path)
    assert path.read_bytes() == before


def test_everything_survives_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    clock = ManualClock()
    with SqliteStore(path, clock=clock) as store:
        store.register(FLOW)
        job_id = store.plan("flow", {"n": 1}, payload={"p": [1, 2]}, priority=3)
        lease = store.lease_next("w")
        assert lease is not None
        assert store.advance(lease, "B")
        assert store.run_effect(lease, "op", lambda ctx: {"r": "é"}, extras={"x": 1}) == {"r": "é"}
        before = (store.job(job_id), store.effects(job_id), store.history(job_id))
    with SqliteStore(path, clock=clock) as again:
        assert again.workflow("flow") == FLOW
        assert again.workflows() == [DOWNLOAD, FLOW]
        assert (again.job(job_id), again.effects(job_id), again.history(job_id)) == before
        assert again.effects(job_id)[0].status is EffectStatus.DONE
        assert [h.event for h in again.history(job_id)] == [
            Event.PLANNED,
            Event.LEASED,
            Event.ADVANCED,
            Event.EFFECT_STARTED,
            Event.EFFECT_RECORDED,
        ]
        # The recorded effect replays from disk without calling fn.
        assert again.run_effect(lease, "op", lambda ctx: 1 / 0, extras={"x": 1}) == {"r": "é"}


def _schema_with_flow(conn: sqlite3.Connection, *, upto: int) -> None:
    """Apply the migrations up to version ``upto`` as they shipped, and store FLOW."""
    conn.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
        " applied_at REAL NOT NULL)"
    )
    for migration in MIGRATIONS[:upto]:
        for statement in migration.statements:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_migrations VALUES (?, ?, 0)", (migration.version, migration.name)
        )
    conn.execute("INSERT INTO workflows VALUES ('flow', ?, 'A', 'FAILED')", (FLOW_TEXT,))
    conn.executemany(
        "INSERT INTO workflow_states VALUES ('flow', ?, ?)",
        [("A", 0), ("B", 0), ("C", 1), ("FAILED", 1)],
    )
    conn.executemany("INSERT INTO workflow_edges VALUES ('flow', ?, ?)", [("A", "B"), ("B", "C")])


def _v1_database(path: Path) -> None:
    """Write a database as version 1 of the schema left it, with one job in use."""
    conn = _raw(path)
    try:
        _schema_with_flow(conn, upto=1)
        conn.execute(
            "INSERT INTO jobs (job_id, seq, kind, identity, payload, state, terminal, attempts,"
            " max_attempts, priority, run_at, token, lease_worker, lease_expires_at,"
            " created_at, updated_at) VALUES (?, 7, 'flow', '{\"n\":1}', 'null', 'B', 0, 1, 5,"
            " 0, 10.0, 1, 'w', 1e12, 10.0, 11.0)",
            (JOB,),
        )
        conn.execute(
            "INSERT INTO effects VALUES ('k1', ?, 'op', '{}', 'done', '1', 10.5, 10.6, 1, 'w', 1)",
            (JOB,),
        )
        conn.executemany(
            "INSERT INTO history (id, job_id, at, event, token, worker, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (3, JOB, 10.0, "planned", 0, None, "{}"),
                (8, JOB, 10.1, "leased", 1, "w", "{}"),
                (9, JOB, 11.0, "advanced", 1, "w", '{"from":"A","to":"B"}'),
            ],
        )
    finally:
        conn.close()


JOB = "f" * 64
FLOW_TEXT = canon(FLOW.definition()).decode("utf-8")


def test_a_version_1_database_upgrades_and_keeps_everything(tmp_path: Path) -> None:
    """Migrations are forward-only: a ledger written by the first schema opens, is
    rebuilt in place, and goes on working with its jobs, effects and history intact."""
    path = tmp_path / "db.sqlite"
    _v1_database(path)
    clock = ManualClock(20.0)
    with SqliteStore(path, clock=clock) as store:
        assert store.workflow("flow").definition() == FLOW.definition()
        job = store.job(JOB)
        assert (job.state, job.attempts, job.token, job.lease_worker) == ("B", 1, 1, "w")
        assert [(e.op_key, e.result) for e in store.effects(JOB)] == [("k1", 1)]
        assert [h.event for h in store.history(JOB)] == [
            Event.PLANNED,
            Event.LEASED,
            Event.ADVANCED,
        ]
        new = store.plan("flow", {"n": 2})
        assert [j.job_id for j in store.jobs()] == [JOB, new], "planned order is kept"
        lease = store.lease_next("w2")
        assert lease is not None
        assert lease.job_id == new
        assert store.run_effect(lease, "op", lambda ctx: 5) == 5
        assert store.advance(lease, "B")
        assert [h.event for h in store.history(new)] == [
            Event.PLANNED,
            Event.LEASED,
            Event.EFFECT_STARTED,
            Event.EFFECT_RECORDED,
            Event.ADVANCED,
        ]
        with pytest.raises(sqlite3.IntegrityError, match="illegal state transition"):
            store._connection().execute("UPDATE jobs SET state = 'A' WHERE job_id = ?", (new,))
        # Entries written after the upgrade come after the ones written before it.
        store.cancel(JOB, "upgraded")
        assert [h.event for h in store.history(JOB)] == [
            Event.PLANNED,
            Event.LEASED,
            Event.ADVANCED,
            Event.CANCELLED,
        ]
    conn = _raw(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        version = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
        assert version == SCHEMA_VERSION
    finally:
        conn.close()


def _v2_database(path: Path) -> tuple[str, str, str]:
    """A version 2 database with three jobs whose effects are open in different ways:
    a start whose lease ended (dead), a start under a live lease, and one in doubt."""
    conn = _raw(path)
    jobs = ("1" * 64, "2" * 64, "3" * 64)
    try:
        _schema_with_flow(conn, upto=2)
        for n, (job_id, worker, expires) in enumerate(
            zip(jobs, (None, "w", None), (None, 1e12, None), strict=True), start=1
        ):
            conn.execute(
                "INSERT INTO jobs (seq, job_id, kind, identity, payload, state, terminal,"
                " attempts, max_attempts, priority, run_at, token, lease_worker,"
                " lease_expires_at, created_at, updated_at)"
                " VALUES (?, ?, 'flow', ?, 'null', 'A', 0, 1, 5, 0, 10.0, 2, ?, ?, 10.0, 11.0)",
                (n, job_id, f'{{"n":{n}}}', worker, expires),
            )
            conn.executemany(
                "INSERT INTO history (job_id, id, at, event, token, worker, detail)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (job_id, 1, 10.0, "planned", 0, None, "{}"),
                    (job_id, 2, 10.5, "leased", 2, "w", "{}"),
                    (job_id, 3, 10.6, "effect_started", 2, "w", '{"op":"op"}'),
                ],
            )
        for job_id, status in zip(jobs, ("started", "started", "in_doubt"), strict=True):
            conn.execute(
                "INSERT INTO effects (job_id, op_key, op, extras, status, result, started_at,"
                " finished_at, token, started_by, seq)"
                " VALUES (?, 'k', 'op', '{}', ?, NULL, 10.6, NULL, 2, 'w', 1)",
                (job_id, status),
            )
    finally:
        conn.close()
    return jobs


def test_a_version_2_database_keeps_its_open_effects_and_history(tmp_path: Path) -> None:
    """Version 3 moves the history and finds dead starts differently: a ledger written by
    version 2 must count and reconcile the same starts, and keep every entry in order."""
    path = tmp_path / "db.sqlite"
    dead, live, doubted = _v2_database(path)
    with SqliteStore(path, clock=ManualClock(20.0)) as store:
        assert store.stats().in_doubt == 2, "the dead start and the one in doubt"
        assert store.reconcile(dry_run=True).effects_in_doubt == 1
        assert store.reconcile().effects_in_doubt == 1
        assert [e.status for e in store.effects(dead)] == [EffectStatus.IN_DOUBT]
        assert [e.status for e in store.effects(live)] == [EffectStatus.STARTED]
        assert [e.status for e in store.effects(doubted)] == [EffectStatus.IN_DOUBT]
        assert [h.event for h in store.history(dead)] == [
            Event.PLANNED,
            Event.LEASED,
            Event.EFFECT_STARTED,
            Event.EFFECT_IN_DOUBT,
        ]
        # The live lease's start becomes dead when its lease ends, like any other.
        store.cancel(live, "stop")
        assert store.stats().in_doubt == 3


def test_a_version_3_database_counts_the_same_without_the_state_index(tmp_path: Path) -> None:
    """Version 4 drops the (kind, state) index: the counts by state and the failed count
    of a ledger written by version 3 read the same from a scan, and new jobs count too."""
    path = tmp_path / "db.sqlite"
    conn = _raw(path)
    try:
        _schema_with_flow(conn, upto=3)
        for n, state, terminal in ((1, "A", 0), (2, "B", 0), (3, "FAILED", 1), (4, "FAILED", 1)):
            conn.execute(
                "INSERT INTO jobs (seq, job_id, kind, identity, payload, state, terminal,"
                " attempts, max_attempts, priority, run_at, token, created_at, updated_at,"
                " hist, hist_n) VALUES (?, ?, 'flow', ?, 'null', ?, ?, 0, 5, 0, 10.0, 0, 10.0,"
                " 10.0, '', 0)",
                (n, str(n) * 64, f'{{"n":{n}}}', state, terminal),
            )
    finally:
        conn.close()
    with SqliteStore(path, clock=ManualClock(20.0)) as store:
        stats = store.stats()
        assert stats.by_state["flow"] == {"A": 1, "B": 1, "C": 0, "FAILED": 2}
        assert stats.failed == 2
        store.plan("flow", {"n": 5})
        assert store.stats().by_state["flow"]["A"] == 2
        indexes = {
            row[0]
            for row in store._connection().execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'jobs'"
            )
        }
    assert "jobs_kind_state" not in indexes
    assert "jobs_active" in indexes


def test_a_version_5_database_gains_the_breakers_table_and_keeps_its_jobs(
    tmp_path: Path,
) -> None:
    """Version 6 adds the breakers table (model/breaker.py): a ledger written by version 5
    keeps its jobs and tombstones, and records and lists breakers after the upgrade."""
    path = tmp_path / "db.sqlite"
    conn = _raw(path)
    try:
        _schema_with_flow(conn, upto=5)
        assert MIGRATIONS[4].version == 5
        conn.execute(
            "INSERT INTO jobs (seq, job_id, kind, identity, payload, state, terminal,"
            " attempts, max_attempts, priority, run_at, token, created_at, updated_at,"
            " hist, hist_n) VALUES (1, ?, 'flow', '{\"n\":1}', 'null', 'B', 0, 1, 5, 0,"
            " 10.0, 1, 10.0, 10.0, '', 1)",
            (job_key("flow", {"n": 1}),),
        )
        conn.execute("INSERT INTO tombstones VALUES (?, 'flow', 'C', 5.0, 6.0)", ("2" * 64,))
        assert (
            conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'breakers'").fetchone() is None
        )
    finally:
        conn.close()
    with SqliteStore(path, clock=ManualClock(20.0)) as store:
        key = job_key("flow", {"n": 1})
        assert store.state(key) == "B"
        assert store.plan("flow", {"n": 1}) == key  # still planned: a no-op
        assert store.breakers() == []
        store.record_breaker("h:80", worker="w", state="open", failures=3, cooldown=30.0)
        (row,) = store.breakers()
        assert (row.host, row.opened_at, row.until) == ("h:80", 20.0, 50.0)
    with closing(_raw(path)) as conn:
        assert conn.execute("SELECT max(version) FROM schema_migrations").fetchone() == (
            SCHEMA_VERSION,
        )
        assert conn.execute("SELECT count(*) FROM tombstones").fetchone() == (1,)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
