"""``jobledger config show``: effective values and where each came from."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from model import Config
from tests.cli.conftest import Outcome


def test_config_show_json_names_every_source(run: Callable[..., Outcome], tmp_path: Path) -> None:
    (tmp_path / "jobledger.yaml").write_text(
        "lease_ttl: 60\nmax_attempts: 3\ndb: from-file.sqlite\n"
    )
    out = run(
        "--set",
        "busy_timeout=9",
        "config",
        "show",
        "--json",
        env={"JOBLEDGER_MAX_ATTEMPTS": "8"},
    )
    assert out.code == 0, out.err
    data = json.loads(out.out)
    assert data["config_file"] == "jobledger.yaml" or data["config_file"].endswith("jobledger.yaml")
    values = data["values"]
    assert list(values) == list(Config.keys())
    assert values["lease_ttl"]["value"] == 60.0
    assert values["lease_ttl"]["source"].endswith("jobledger.yaml:1")
    assert values["max_attempts"] == {
        "value": 8,
        "source": "JOBLEDGER_MAX_ATTEMPTS",
        "env": "JOBLEDGER_MAX_ATTEMPTS",
    }
    assert values["busy_timeout"]["source"] == "command line"
    assert values["result_limit"]["source"] == "default"
    assert data["db"]["value"] == "from-file.sqlite"
    assert data["db"]["source"].endswith("jobledger.yaml:3")


def test_db_precedence_option_over_env_over_file(
    run: Callable[..., Outcome], tmp_path: Path
) -> None:
    (tmp_path / "jobledger.yaml").write_text("db: file.sqlite\n")

    def db(*args: str, env: dict[str, str] | None = None) -> dict[str, str]:
        out = run(*args, "config", "show", "--json", env=env)
        assert out.code == 0, out.err
        result: dict[str, str] = json.loads(out.out)["db"]
        return result

    assert db()["value"] == "file.sqlite"
    assert db(env={"JOBLEDGER_DB": "env.sqlite"}) == {
        "value": "env.sqlite",
        "source": "JOBLEDGER_DB",
    }
    assert db("--db", "opt.sqlite", env={"JOBLEDGER_DB": "env.sqlite"}) == {
        "value": "opt.sqlite",
        "source": "--db",
    }


def test_config_flag_and_env_choose_the_file(run: Callable[..., Outcome], tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("lease_ttl: 11\n")
    (tmp_path / "b.yaml").write_text("lease_ttl: 22\n")
    by_env = run("config", "show", "--json", env={"JOBLEDGER_CONFIG": "a.yaml"})
    assert json.loads(by_env.out)["values"]["lease_ttl"]["value"] == 11.0
    by_flag = run(
        "--config", "b.yaml", "config", "show", "--json", env={"JOBLEDGER_CONFIG": "a.yaml"}
    )
    assert json.loads(by_flag.out)["values"]["lease_ttl"]["value"] == 22.0


def test_config_show_human(run: Callable[..., Outcome]) -> None:
    out = run("config", "show", env={"JOBLEDGER_LEASE_TTL": "45"})
    assert out.code == 0, out.err
    assert "config file: (none)" in out.out
    assert "database: jobledger.sqlite (from default)" in out.out
    line = next(line for line in out.out.splitlines() if line.startswith("lease_ttl"))
    assert "45.0" in line
    assert "JOBLEDGER_LEASE_TTL" in line
