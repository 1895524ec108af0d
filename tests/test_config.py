"""Loading the configuration: layers, sources, and errors that name what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from impl.config import load_config
from model import Config, ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "jobledger.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_when_nothing_is_set() -> None:
    config, sources = load_config(config_file=None, env={}, overrides={})
    assert config == Config()
    assert set(sources) == set(Config.keys())
    assert set(sources.values()) == {"default"}


def test_file_then_env_then_command_line_each_win(tmp_path: Path) -> None:
    path = write(tmp_path, "lease_ttl: 60\nmax_attempts: 7\nbusy_timeout: 2\n")
    env = {"JOBLEDGER_MAX_ATTEMPTS": "9", "JOBLEDGER_BUSY_TIMEOUT": "3.5", "HOME": "/x"}
    config, sources = load_config(config_file=path, env=env, overrides={"busy_timeout": "4"})
    assert config.lease_ttl == 60.0
    assert isinstance(config.lease_ttl, float)
    assert config.max_attempts == 9
    assert config.busy_timeout == 4.0
    assert sources["lease_ttl"] == f"{path}:1"
    assert sources["max_attempts"] == "JOBLEDGER_MAX_ATTEMPTS"
    assert sources["busy_timeout"] == "command line"
    assert sources["result_limit"] == "default"


def test_jobledger_db_sets_db_and_non_config_variables_are_allowed() -> None:
    env = {
        "JOBLEDGER_DB": "/tmp/x.sqlite",
        "JOBLEDGER_CONFIG": "a.yaml",
        "JOBLEDGER_FAILPOINTS": "",
        "JOBLEDGER_FUZZ_SECONDS": "3",
        "JOBLEDGER_TEST_PG": "postgresql://x",
    }
    config, sources = load_config(config_file=None, env=env, overrides={})
    assert config.db == "/tmp/x.sqlite"
    assert sources["db"] == "JOBLEDGER_DB"


def test_optional_values_accept_empty_for_none() -> None:
    config, _ = load_config(
        config_file=None, env={"JOBLEDGER_RENEW_EVERY": ""}, overrides={"db": ""}
    )
    assert config.renew_every is None
    assert config.db is None


def test_unknown_file_key_names_key_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "lease_ttl: 60\nlease_tll: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(config_file=path, env={}, overrides={})
    text = str(info.value)
    assert "'lease_tll'" in text
    assert f"{path}:2" in text
    assert "lease_ttl" in text  # the known keys are listed


def test_unknown_env_var_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="JOBLEDGER_LEASE_TTLL"):
        load_config(config_file=None, env={"JOBLEDGER_LEASE_TTLL": "3"}, overrides={})


def test_lowercase_variable_is_not_taken_for_a_key() -> None:
    with pytest.raises(ConfigError, match="JOBLEDGER_lease_ttl"):
        load_config(config_file=None, env={"JOBLEDGER_lease_ttl": "3"}, overrides={})


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"JOBLEDGER_LEASE_TTL": "soon"}, ["lease_ttl", "JOBLEDGER_LEASE_TTL", "a number"]),
        ({"JOBLEDGER_LEASE_TTL": "-1"}, ["lease_ttl", "JOBLEDGER_LEASE_TTL", "> 0"]),
        ({"JOBLEDGER_MAX_ATTEMPTS": "2.5"}, ["max_attempts", "an integer"]),
        ({"JOBLEDGER_MAX_ATTEMPTS": "0"}, ["max_attempts", ">= 1"]),
        ({"JOBLEDGER_SQLITE_SYNCHRONOUS": "FAST"}, ["sqlite_synchronous", "NORMAL, FULL"]),
        ({"JOBLEDGER_LOG_FORMAT": "xml"}, ["log_format", "'json'"]),
        ({"JOBLEDGER_BACKOFF_JITTER": "2"}, ["backoff_jitter", "0 to 1"]),
        ({"JOBLEDGER_BUSY_TIMEOUT": "true"}, ["busy_timeout", "a number"]),
    ],
)
def test_bad_env_value_names_key_source_and_accepted_values(
    env: dict[str, str], words: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(config_file=None, env=env, overrides={})
    text = str(info.value)
    for word in words:
        assert word in text
    assert next(iter(env)) in text


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("lease_ttl: abc\n", ["lease_ttl", "a number", ":1"]),
        ("max_attempts: true\n", ["max_attempts", "an integer"]),
        ("log_format: 3\n", ["log_format", "a string"]),
        ("lease_ttl: [1, 2]\n", ["lease_ttl", "flat mapping"]),
        ("\nbusy_timeout: -2\n", ["busy_timeout", ">= 0", ":2"]),
    ],
)
def test_bad_file_value_names_key_file_and_line(
    tmp_path: Path, text: str, words: list[str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(config_file=path, env={}, overrides={})
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "lease_ttl: 60\nmax_attempts: [1,\nbusy_timeout: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(config_file=path, env={}, overrides={})
    assert str(path) in str(info.value)
    assert "not valid YAML" in str(info.value)
    assert ":3" in str(info.value) or ":4" in str(info.value)


def test_file_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- lease_ttl\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(config_file=path, env={}, overrides={})


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing yet\n")
    config, _ = load_config(config_file=path, env={}, overrides={})
    assert config == Config()


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(config_file=tmp_path / "nope.yaml", env={}, overrides={})


def test_unknown_command_line_key() -> None:
    with pytest.raises(ConfigError, match="'nope'"):
        load_config(config_file=None, env={}, overrides={"nope": "1"})


def test_related_keys_are_checked_after_merging_with_both_sources(tmp_path: Path) -> None:
    path = write(tmp_path, "lease_ttl: 60\n")
    config, _ = load_config(config_file=path, env={"JOBLEDGER_RENEW_EVERY": "40"}, overrides={})
    assert config.renew_every == 40.0
    with pytest.raises(ConfigError) as info:
        load_config(config_file=path, env={"JOBLEDGER_RENEW_EVERY": "90"}, overrides={})
    assert "JOBLEDGER_RENEW_EVERY" in str(info.value)
    assert f"{path}:1" in str(info.value)
