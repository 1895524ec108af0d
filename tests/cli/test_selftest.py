"""``jobledger selftest`` runs the crash fuzz on a directory and reports a verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from impl.cli.main import cli


@pytest.mark.xdist_group("fuzz")
def test_selftest_reports_a_clean_history_as_json(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        ["selftest", "--dir", str(tmp_path), "--seconds", "3", "--workers", "2", "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] is True
    assert report["violations"] == []
    assert report["jobs"] > 0
    assert list(tmp_path.iterdir()) == []  # a passing run removes its folder


@pytest.mark.xdist_group("fuzz")
def test_selftest_with_a_relative_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers run inside the run's folder; a relative --dir must still reach them."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        cli, ["selftest", "--dir", "disk", "--seconds", "2", "--workers", "1", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["violations"] == []
    assert report["kills"] >= 0
    assert report["effects_recorded"] > 0


def test_selftest_refuses_a_bad_option(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["selftest", "--dir", str(tmp_path), "--seconds", "0"])
    assert result.exit_code == 2
    assert "--seconds" in result.output
