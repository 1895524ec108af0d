"""Every command against a ``postgresql://`` target, each test in a fresh schema.

In process through ``CliRunner``, and once as a real ``python -m impl`` (each costs about
a second of start-up, so that test runs only the commands that matter end to end).

The schema is chosen with ``--set postgres_schema=...`` (in process) or
``JOBLEDGER_POSTGRES_SCHEMA`` (the real process) and dropped afterwards.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import psycopg
import pytest
from psycopg import sql

from impl.cli.migrate import redact
from impl.postgres.schema import SCHEMA_VERSION
from impl.postgres.store import PostgresStore, pending_migrations
from model import Config, ManualClock, Plan
from tests.cli.conftest import ROOT, THUMB, Ledger, Outcome, populate
from tests.pg import PG_URL, require_postgres

pytestmark = pytest.mark.postgres

HANDLERS = """
def done(ctx):
    ctx.advance("DONE")

def boom(ctx):
    raise RuntimeError("thumbnailer crashed")

handlers = {"thumb": done}
failing = {"thumb": boom}
"""


@attrs.frozen
class Pg:
    """A fresh schema on the test server and the options that point the command at it."""

    schema: str

    @property
    def args(self) -> list[str]:
        return ["--db", PG_URL, "--set", f"postgres_schema={self.schema}"]

    @property
    def config(self) -> Config:
        return Config(postgres_schema=self.schema)

    def open(self, clock: ManualClock | None = None) -> PostgresStore:
        return PostgresStore(PG_URL, clock=clock, config=self.config)

    def exists(self) -> bool:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            found = conn.execute(
                "SELECT 1 FROM pg_namespace WHERE nspname = %(name)s", {"name": self.schema}
            ).fetchone()
        return found is not None


@pytest.fixture
def pg() -> Iterator[Pg]:
    require_postgres()
    target = Pg(f"t_cli_{uuid.uuid4().hex[:12]}")
    yield target
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(target.schema))
        )


@pytest.fixture
def pg_ledger(pg: Pg) -> Ledger:
    """The populated ledger of tests/cli/conftest.py, written 100 s ago in ``pg``'s schema."""
    clock = ManualClock(time.time() - 100)
    with pg.open(clock) as store:
        return populate(store, clock, Path("unused"))


def make_newer(pg: Pg) -> None:
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(
            sql.SQL("INSERT INTO {} (version, name) VALUES (999, 'from the future')").format(
                sql.Identifier(pg.schema, "schema_migrations")
            )
        )


# -- migrate ---------------------------------------------------------------------------


def test_check_of_a_fresh_schema_is_pending_and_creates_nothing(
    run: Callable[..., Outcome], pg: Pg
) -> None:
    out = run(*pg.args, "migrate", "--check")
    assert out.code == 1, out.err
    assert "pending migration 1: initial schema" in out.out
    assert pg.schema in out.out
    as_json = run(*pg.args, "migrate", "--check", "--json")
    assert as_json.code == 1
    data = json.loads(as_json.out)
    assert data["db"] == PG_URL
    assert data["schema"] == pg.schema
    assert [m["version"] for m in data["pending"]] == list(range(1, SCHEMA_VERSION + 1))
    assert data["applied"] == []
    assert not pg.exists()


def test_migrate_applies_then_check_passes(run: Callable[..., Outcome], pg: Pg) -> None:
    out = run(*pg.args, "migrate", "--json")
    assert out.code == 0, out.err
    data = json.loads(out.out)
    assert [m["version"] for m in data["applied"]] == list(range(1, SCHEMA_VERSION + 1))
    assert data["pending"] == []
    assert pg.exists()
    check = run(*pg.args, "migrate", "--check")
    assert check.code == 0, check.err
    assert "up to date" in check.out
    again = run(*pg.args, "migrate")
    assert again.code == 0, again.err
    assert "applied" not in again.out
    assert pending_migrations(PG_URL, config=pg.config) == []


def test_schema_from_the_environment(run: Callable[..., Outcome], pg: Pg) -> None:
    env = {"JOBLEDGER_DB": PG_URL, "JOBLEDGER_POSTGRES_SCHEMA": pg.schema}
    assert run("migrate", "--check", env=env).code == 1
    assert run("migrate", env=env).code == 0
    assert pg.exists()
    assert run("migrate", "--check", env=env).code == 0


def test_check_of_a_newer_schema_exits_3(run: Callable[..., Outcome], pg: Pg) -> None:
    assert run(*pg.args, "migrate").code == 0
    make_newer(pg)
    out = run(*pg.args, "migrate", "--check")
    assert out.code == 3
    assert "version 999" in out.err
    assert len(out.err.strip().splitlines()) == 1
    applying = run(*pg.args, "migrate")
    assert applying.code == 3
    assert "newer" in applying.err


def test_check_of_an_unreachable_server_exits_3(run: Callable[..., Outcome]) -> None:
    out = run("--db", "postgresql://postgres@127.0.0.1:1/test", "migrate", "--check")
    assert out.code == 3
    assert out.err.startswith("error: ")
    assert "Traceback" not in out.err


def test_check_of_a_memory_target_is_bad_usage(run: Callable[..., Outcome]) -> None:
    out = run("--db", "memory:", "migrate", "--check")
    assert out.code == 2
    assert "no schema to check" in out.err


def test_redact_hides_only_the_password() -> None:
    assert redact("postgresql://u:secret@db.example:6543/x?sslmode=require") == (
        "postgresql://u:***@db.example:6543/x?sslmode=require"
    )
    assert redact(PG_URL) == PG_URL
    assert redact("jobs.sqlite") == "jobs.sqlite"


# -- every other command ---------------------------------------------------------------


def test_read_commands(run: Callable[..., Outcome], pg: Pg, pg_ledger: Ledger) -> None:
    status = run(*pg.args, "status", "--json")
    assert status.code == 0, status.err
    stats = json.loads(status.out)
    assert stats["by_state"]["download"]["PLANNED"] == 2
    assert stats["by_state"]["download"]["HEAD_DONE"] == 1
    assert stats["by_state"]["download"]["FAILED"] == 1
    assert stats["by_state"]["thumb"] == {"PLANNED": 0, "DONE": 0, "FAILED": 0}
    assert (stats["leases_live"], stats["leases_expired"], stats["failed"]) == (1, 1, 1)
    assert stats["in_doubt"] == 1
    assert pg_ledger.has_doubt

    jobs = run(*pg.args, "jobs", "--json")
    assert jobs.code == 0, jobs.err
    assert [j["job_id"] for j in json.loads(jobs.out)] == [
        pg_ledger.waiting,
        pg_ledger.cancelled,
        pg_ledger.live,
        pg_ledger.expired,
    ]
    failed = json.loads(run(*pg.args, "jobs", "--json", "--state", "FAILED").out)
    assert [j["job_id"] for j in failed] == [pg_ledger.cancelled]
    assert failed[0]["last_error"] == "bad url"

    show = run(*pg.args, "show", pg_ledger.live[:10], "--json")
    assert show.code == 0, show.err
    job = json.loads(show.out)
    assert job["job_id"] == pg_ledger.live
    assert job["state"] == "HEAD_DONE"
    assert [(e["op"], e["status"]) for e in job["effects"]] == [("HEAD", "done")]
    assert job["effects"][0]["result"] == {"status": 200, "length": 5}
    events = [e["event"] for e in job["history"]]
    assert events == ["planned", "leased", "effect_started", "effect_recorded", "advanced"]

    # The ledger was written on a clock 100 s behind; the command reads the server's.
    leases = run(*pg.args, "leases", "--json")
    assert leases.code == 0, leases.err
    rows = {row["job_id"]: row for row in json.loads(leases.out)}
    assert set(rows) == {pg_ledger.live, pg_ledger.expired}
    assert rows[pg_ledger.live]["worker"] == "worker-1"
    assert 3000 < rows[pg_ledger.live]["seconds_left"] <= 3550
    assert rows[pg_ledger.expired]["live"] is False
    human = run(*pg.args, "leases")
    assert "worker-1" in human.out
    assert " left" in human.out


def test_leases_on_an_injected_clock(run: Callable[..., Outcome], pg: Pg) -> None:
    """The command shows time left by the store's clock, here a manual one in 1970."""
    clock = ManualClock(1_000_000.0)
    with pg.open(clock) as store:
        ledger = populate(store, clock, Path("unused"))

    def opener(_target: str, config: Config) -> PostgresStore:
        assert config.postgres_schema == pg.schema
        return pg.open(clock)

    clock.advance(450)
    out = run(*pg.args, "leases", "--json", obj=opener)
    assert out.code == 0, out.err
    rows = {row["job_id"]: row for row in json.loads(out.out)}
    assert rows[ledger.live]["seconds_left"] == 3100.0
    show = run(*pg.args, "show", ledger.live, obj=opener)
    assert "51 min 40 s left" in show.out


def test_operator_commands(run: Callable[..., Outcome], pg: Pg, pg_ledger: Ledger) -> None:
    dry = run(*pg.args, "reconcile", "--dry-run", "--json")
    assert dry.code == 0, dry.err
    assert json.loads(dry.out) == {
        "leases_expired": 1,
        "effects_in_doubt": 1,
        "jobs_failed": 0,
        "dry_run": True,
    }
    real = run(*pg.args, "reconcile", "--json")
    assert json.loads(real.out)["leases_expired"] == 1
    assert json.loads(run(*pg.args, "reconcile", "--json").out)["leases_expired"] == 0

    cancel = run(*pg.args, "cancel", pg_ledger.live[:12], "--reason", "stuck on host")
    assert cancel.code == 0, cancel.err
    assert "now FAILED" in cancel.out
    with pg.open() as store:
        job = store.job(pg_ledger.live)
    assert (job.state, job.last_error, job.lease) == ("FAILED", "stuck on host", None)

    retry = run(*pg.args, "retry", "--all-failed")
    assert retry.code == 0, retry.err
    assert "retried 2 job(s)" in retry.out
    with pg.open() as store:
        assert store.state(pg_ledger.live) == "HEAD_DONE"
        assert store.state(pg_ledger.cancelled) == "PLANNED"
    not_failed = run(*pg.args, "retry", pg_ledger.live)
    assert not_failed.code == 2
    assert not_failed.err.startswith("error: ")
    unknown = run(*pg.args, "cancel", "0" * 64, "--reason", "x")
    assert unknown.code == 2


@pytest.fixture
def handlers_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A handlers module in ``tmp_path`` (on sys.path), under a name unique to this test."""
    name = f"pg_handlers_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(HANDLERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def plan_thumbs(pg: Pg, count: int, *, max_attempts: int = 5) -> list[str]:
    with pg.open() as store:
        store.register(THUMB)
        return store.plan_many(
            "thumb", [Plan({"n": i}, max_attempts=max_attempts) for i in range(count)]
        )


def test_worker_until_idle(run: Callable[..., Outcome], pg: Pg, handlers_module: str) -> None:
    ids = plan_thumbs(pg, 4)
    out = run(
        *pg.args, "worker", f"{handlers_module}:handlers", "--until-idle", "--concurrency", "2"
    )
    assert out.code == 0, out.err
    assert "4 finished" in out.out
    with pg.open() as store:
        assert {store.state(i) for i in ids} == {"DONE"}
    jobs = json.loads(run(*pg.args, "jobs", "--json", "--kind", "thumb").out)
    assert [j["state"] for j in jobs] == ["DONE"] * 4


def test_worker_exits_1_when_jobs_failed(
    run: Callable[..., Outcome], pg: Pg, handlers_module: str
) -> None:
    ids = plan_thumbs(pg, 2, max_attempts=1)
    out = run(*pg.args, "worker", f"{handlers_module}:failing", "--until-idle")
    assert out.code == 1
    assert "2 job(s) failed" in out.err
    job = json.loads(run(*pg.args, "show", ids[0], "--json").out)
    assert job["state"] == "FAILED"
    assert "thumbnailer crashed" in job["last_error"]


# -- a real process --------------------------------------------------------------------


@pytest.mark.xdist_group("processes")
def test_real_process(run_process: Callable[..., Outcome], pg: Pg, tmp_path: Path) -> None:
    folder = tmp_path / "handlers"
    folder.mkdir()
    (folder / "pg_process_handlers.py").write_text(HANDLERS)
    env = {
        "JOBLEDGER_DB": PG_URL,
        "JOBLEDGER_POSTGRES_SCHEMA": pg.schema,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(folder)]),
    }
    check = run_process("migrate", "--check", env=env)
    assert check.code == 1, check.err
    migrated = run_process("migrate", "--json", env=env)
    assert migrated.code == 0, migrated.err
    assert json.loads(migrated.out)["schema"] == pg.schema

    ids = plan_thumbs(pg, 3)
    worker = run_process("worker", "pg_process_handlers:handlers", "--until-idle", env=env)
    assert worker.code == 0, worker.err
    assert "3 finished" in worker.out
    status = run_process("status", "--json", env=env)
    assert status.code == 0, status.err
    assert json.loads(status.out)["by_state"]["thumb"]["DONE"] == 3
    with pg.open() as store:
        assert {store.state(i) for i in ids} == {"DONE"}
