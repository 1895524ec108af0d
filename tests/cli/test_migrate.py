"""``jobledger migrate [--check]`` on SQLite files (PostgreSQL: test_postgres.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from impl import open_store
from impl.sqlite.schema import SCHEMA_VERSION
from tests.cli.conftest import Outcome


def test_check_of_a_missing_database_reports_pending_and_creates_nothing(
    run: Callable[..., Outcome], tmp_path: Path
) -> None:
    path = tmp_path / "new.sqlite"
    out = run("--db", str(path), "migrate", "--check")
    assert out.code == 1
    assert "pending migration 1" in out.out
    assert not path.exists()


def test_migrate_creates_then_check_passes(run: Callable[..., Outcome], tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite"
    out = run("--db", str(path), "migrate", "--json")
    assert out.code == 0, out.err
    data = json.loads(out.out)
    assert [m["version"] for m in data["applied"]] == list(range(1, SCHEMA_VERSION + 1))
    assert data["pending"] == []
    check = run("--db", str(path), "migrate", "--check")
    assert check.code == 0, check.err
    assert "up to date" in check.out
    again = run("--db", str(path), "migrate")
    assert again.code == 0
    assert "applied" not in again.out
    with open_store(path) as store:
        assert store.stats().by_state["download"]["PLANNED"] == 0


def test_check_writes_nothing(run: Callable[..., Outcome], tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    run("--db", str(path), "migrate")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert run("--db", str(path), "migrate", "--check").code == 0
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before
