"""The multi-process crash fuzz against PostgreSQL: SIGKILLs and server-side disconnects.

The same engine and checker as ``test_fuzz.py``, with the ledger in a fresh schema on the
test server (the sink, clock and histories stay in ``tmp_path``). Besides the SIGKILLs,
the parent terminates a random worker's sessions from the server side with
``pg_terminate_backend``; the worker must live through it (the call in flight fails
with ``StorageError``, the pool reconnects, the loop goes on) and the history must stay
clean. The default run spends about a minute in the chaos phase; ``JOBLEDGER_FUZZ_SECONDS``
makes it longer and ``JOBLEDGER_FUZZ_SEED`` replays a seed's decisions.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from impl import selftest
from impl.fuzz import checker as c
from impl.fuzz.engine import FuzzResult, FuzzSettings, run_fuzz
from impl.fuzz.ledger import SqliteLedger, open_ledger
from impl.fuzz.postgres import PostgresLedger, with_application_name
from impl.selftest import SelftestReport, without_password
from model.errors import ConfigError
from tests.pg import PG_URL, require_postgres

SECONDS_DEFAULT = 60.0
SECONDS = float(os.environ.get("JOBLEDGER_FUZZ_SECONDS", SECONDS_DEFAULT))
MIN_KILLS = 30
MIN_DISCONNECTS = 5
TEST = "tests/fuzz/test_fuzz_postgres.py"


def _seed() -> int:
    text = os.environ.get("JOBLEDGER_FUZZ_SEED")
    return int(text) if text else random.SystemRandom().randrange(2**32)


def _report(result: FuzzResult, seed: int, seconds: float, test: str) -> str:
    rerun = (
        f"JOBLEDGER_FUZZ_SEED={seed} JOBLEDGER_FUZZ_SECONDS={seconds:g} "
        f"python -m pytest -p no:cacheprovider '{TEST}::{test}'"
    )
    return SelftestReport(result, rerun).render(max_violations=40)


def _schemas_like(pattern: str) -> list[str]:
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", [pattern]
        ).fetchall()
    return [str(row[0]) for row in rows]


def _drop(schema: str) -> None:
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.mark.postgres
@pytest.mark.xdist_group("fuzz")
@pytest.mark.timeout(2 * SECONDS + 600)
def test_postgres_crash_fuzz_history_is_clean(tmp_path: Path) -> None:
    require_postgres()
    seconds = SECONDS
    seed = _seed()
    result = run_fuzz(
        tmp_path,
        FuzzSettings(
            seconds=seconds,
            seed=seed,
            db=PG_URL,
            min_kills=MIN_KILLS,
            min_disconnects=MIN_DISCONNECTS,
            max_seconds=seconds + 60,
        ),
    )
    text = _report(result, seed, seconds, "test_postgres_crash_fuzz_history_is_clean")
    print(text)
    assert result.backend == "postgresql", text
    assert result.ok, text
    assert result.kills >= MIN_KILLS, text
    assert result.disconnects >= MIN_DISCONNECTS, text
    assert result.jobs > 0, text
    assert sum(result.by_state.values()) == result.jobs, text
    # A passing run leaves nothing behind: not its folder, not its schema.
    assert result.schema_kept is None, text
    assert list(tmp_path.iterdir()) == [], text
    assert _schemas_like(f"fuzz\\_{seed}\\_%") == [], text


@pytest.mark.postgres
@pytest.mark.xdist_group("fuzz")
@pytest.mark.timeout(300)
def test_failing_postgres_run_keeps_and_names_its_schema(tmp_path: Path) -> None:
    """A broken build (effects hand the sink a stale token) fails the check; the run's
    schema then stays for the post-mortem, named in the report."""
    require_postgres()
    seed = _seed()
    result = run_fuzz(
        tmp_path,
        FuzzSettings(
            seconds=5.0,
            seed=seed,
            workers=2,
            db=PG_URL,
            child_module="tests.fuzz.broken_child",
            child_env={"FUZZ_BROKEN": "stale-token"},
        ),
    )
    try:
        text = _report(result, seed, 5.0, "test_failing_postgres_run_keeps_and_names_its_schema")
        print(text)
        assert not result.ok
        assert c.UNFENCED_EXECUTION in {v.rule for v in result.violations}
        assert result.schema_kept is not None
        assert result.schema_kept.startswith(f"fuzz_{seed}_")
        assert f"schema {result.schema_kept}" in text
        assert _schemas_like(result.schema_kept) == [result.schema_kept]
        assert result.folder is not None
        assert result.schema_kept in (result.folder / "ledger.txt").read_text()
    finally:
        if result.schema_kept is not None:
            _drop(result.schema_kept)


@pytest.mark.postgres
def test_disconnect_terminates_only_the_named_workers_sessions(tmp_path: Path) -> None:
    require_postgres()
    ledger = PostgresLedger.create(PG_URL, seed=0)
    try:
        with (
            psycopg.connect(ledger.target("w0001"), autocommit=True) as victim,
            psycopg.connect(ledger.target("w0002"), autocommit=True) as bystander,
        ):
            assert ledger.disconnect("w0001") == 1
            with pytest.raises(psycopg.OperationalError):
                victim.execute("SELECT 1")
            assert bystander.execute("SELECT 1").fetchone() == (1,)
            assert ledger.disconnect("w0001") == 0
    finally:
        ledger.close(discard=True)
    assert _schemas_like(ledger.schema) == []


@pytest.mark.postgres
@pytest.mark.xdist_group("fuzz")
@pytest.mark.timeout(300)
def test_selftest_on_postgres_names_the_backend_and_cleans_up(tmp_path: Path) -> None:
    require_postgres()
    report = selftest.run(tmp_path, seconds=3.0, seed=11, workers=2, db=PG_URL)
    text = report.render()
    print(text)
    assert report.ok, text
    data = report.as_dict()
    assert data["backend"] == "postgresql"
    assert data["schema_kept"] is None
    assert "on postgresql" in text
    assert "disconnects" in text
    assert report.rerun.endswith(f"--db {PG_URL}")
    assert list(tmp_path.iterdir()) == []
    assert _schemas_like("fuzz\\_11\\_%") == []


def test_worker_urls_carry_their_application_name() -> None:
    url = "postgresql://u@h:5432/db?sslmode=disable&application_name=old"
    out = with_application_name(url, "jobledger-fuzz-ab-w0001")
    assert (
        out == "postgresql://u@h:5432/db?sslmode=disable&application_name=jobledger-fuzz-ab-w0001"
    )
    assert with_application_name("postgresql://h/db", "x") == "postgresql://h/db?application_name=x"


def test_rerun_commands_never_print_a_password() -> None:
    assert without_password("postgresql://u:secret@h:5/db?a=b") == "postgresql://u:***@h:5/db?a=b"
    assert without_password(PG_URL) == PG_URL


def test_ledger_is_sqlite_by_default_and_refuses_other_urls(tmp_path: Path) -> None:
    assert open_ledger(tmp_path, None, seed=1) == SqliteLedger(tmp_path / "ledger.sqlite")
    with pytest.raises(ConfigError, match="postgresql://"):
        open_ledger(tmp_path, "mysql://h/db", seed=1)
