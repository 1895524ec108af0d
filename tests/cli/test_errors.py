"""Expected failures: one line on stderr, no traceback, and the contract's exit code."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cli.conftest import (
    Ledger,
    Outcome,
    lock_exclusively,
    lock_for_writes,
    make_corrupt,
    make_newer,
)

JOB = "0" * 64
FAST = {"JOBLEDGER_BUSY_TIMEOUT": "0.1"}

READS = [["status"], ["status", "--json"], ["leases"], ["jobs", "--json"], ["show", JOB]]
WRITES = [["reconcile"], ["retry", JOB], ["cancel", JOB, "--reason", "r"]]
EVERY = [*READS, *WRITES, ["migrate"], ["migrate", "--check"]]


def one_error_line(out: Outcome) -> str:
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err
    assert "Traceback" not in out.err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("args", READS + WRITES, ids=" ".join)
def test_missing_database_exits_3_and_creates_nothing(
    run: Callable[..., Outcome], tmp_path: Path, args: list[str]
) -> None:
    path = tmp_path / "nope.sqlite"
    out = run("--db", str(path), *args)
    assert out.code == 3
    line = one_error_line(out)
    assert f"no database at {path}" in line
    assert "jobledger migrate" in line
    assert not path.exists()


def test_missing_default_database_names_it(run: Callable[..., Outcome]) -> None:
    out = run("status")
    assert out.code == 3
    assert "no database at jobledger.sqlite (from default)" in one_error_line(out)


@pytest.mark.parametrize("args", EVERY, ids=" ".join)
def test_exclusively_locked_database_exits_3(
    run: Callable[..., Outcome], ledger: Ledger, args: list[str]
) -> None:
    holder = lock_exclusively(ledger.path)
    try:
        out = run("--db", str(ledger.path), *args, env=FAST)
    finally:
        holder.close()
    assert out.code == 3, (out.out, out.err)
    assert "locked" in one_error_line(out)


@pytest.mark.parametrize("args", WRITES, ids=" ".join)
def test_a_long_writer_makes_writes_exit_3(
    run: Callable[..., Outcome], ledger: Ledger, args: list[str]
) -> None:
    holder = lock_for_writes(ledger.path)
    try:
        out = run("--db", str(ledger.path), *args, env=FAST)
    finally:
        holder.close()
    assert out.code == 3, (out.out, out.err)
    assert "locked" in one_error_line(out)


@pytest.mark.parametrize("args", [["status", "--json"], ["jobs"], ["leases"]], ids=" ".join)
def test_reads_go_on_beside_a_long_writer(
    run: Callable[..., Outcome], ledger: Ledger, args: list[str]
) -> None:
    """WAL lets readers in while a writer holds the lock; an operator can look at a busy ledger."""
    holder = lock_for_writes(ledger.path)
    try:
        out = run("--db", str(ledger.path), *args, env=FAST)
    finally:
        holder.close()
    assert out.code == 0, out.err


@pytest.mark.parametrize("args", EVERY, ids=" ".join)
def test_corrupt_file_exits_3(run: Callable[..., Outcome], tmp_path: Path, args: list[str]) -> None:
    path = tmp_path / "garbage.sqlite"
    make_corrupt(path)
    before = path.read_bytes()
    out = run("--db", str(path), *args)
    assert out.code == 3, (out.out, out.err)
    assert "not a jobledger database" in one_error_line(out)
    assert path.read_bytes() == before


@pytest.mark.parametrize("args", EVERY, ids=" ".join)
def test_newer_schema_exits_3(run: Callable[..., Outcome], ledger: Ledger, args: list[str]) -> None:
    make_newer(ledger.path)
    out = run("--db", str(ledger.path), *args)
    assert out.code == 3, (out.out, out.err)
    assert "version 999" in one_error_line(out)


def test_directory_as_database_exits_3(run: Callable[..., Outcome], tmp_path: Path) -> None:
    out = run("--db", str(tmp_path), "status")
    assert out.code == 3
    assert "is a directory" in one_error_line(out)


def test_unknown_key_in_default_config_file_exits_2(
    run: Callable[..., Outcome], ledger: Ledger, tmp_path: Path
) -> None:
    (tmp_path / "jobledger.yaml").write_text("lease_ttl: 60\nleese_ttl: 3\n")
    out = run("--db", str(ledger.path), "status")
    assert out.code == 2
    line = one_error_line(out)
    assert "'leese_ttl'" in line
    assert "jobledger.yaml:2" in line


def test_bad_yaml_exits_2_naming_file_and_line(
    run: Callable[..., Outcome], ledger: Ledger, tmp_path: Path
) -> None:
    config = tmp_path / "conf.yaml"
    config.write_text("lease_ttl: 60\nmax_attempts: {\n")
    out = run("--db", str(ledger.path), "--config", str(config), "jobs")
    assert out.code == 2
    line = one_error_line(out)
    assert str(config) in line
    assert "not valid YAML" in line


def test_missing_config_file_exits_2(run: Callable[..., Outcome], tmp_path: Path) -> None:
    out = run("--config", str(tmp_path / "none.yaml"), "status")
    assert out.code == 2
    assert "does not exist" in one_error_line(out)


def test_unknown_env_var_exits_2(run: Callable[..., Outcome], ledger: Ledger) -> None:
    out = run("--db", str(ledger.path), "status", env={"JOBLEDGER_LEASE_TIME": "3"})
    assert out.code == 2
    assert "JOBLEDGER_LEASE_TIME" in one_error_line(out)


def test_bad_env_value_exits_2(run: Callable[..., Outcome], ledger: Ledger) -> None:
    out = run("--db", str(ledger.path), "jobs", env={"JOBLEDGER_MAX_ATTEMPTS": "many"})
    assert out.code == 2
    line = one_error_line(out)
    assert "JOBLEDGER_MAX_ATTEMPTS" in line
    assert "an integer" in line


@pytest.mark.parametrize(
    ("setting", "word"),
    [("lease_ttl", "KEY=VALUE"), ("nokey=1", "'nokey'"), ("lease_ttl=-1", "> 0")],
)
def test_bad_set_option_exits_2(
    run: Callable[..., Outcome], ledger: Ledger, setting: str, word: str
) -> None:
    out = run("--db", str(ledger.path), "--set", setting, "status")
    assert out.code == 2
    assert word in out.err
    assert "Traceback" not in out.err


def test_help_works_even_with_a_broken_config(run: Callable[..., Outcome], tmp_path: Path) -> None:
    (tmp_path / "jobledger.yaml").write_text("nonsense_key: 1\n")
    out = run("status", "--help")
    assert out.code == 0
    assert "Usage:" in out.out


def test_debug_shows_the_traceback(run: Callable[..., Outcome], tmp_path: Path) -> None:
    out = run("--debug", "--db", str(tmp_path / "nope.sqlite"), "status")
    assert out.code == 3
    assert "Traceback" in out.err
    assert out.err.strip().splitlines()[-1].startswith("error: no database at")


def test_unknown_command_is_usage_error(run: Callable[..., Outcome]) -> None:
    out = run("statsu")
    assert out.code == 2
    assert "No such command" in out.err
