"""Loading the configuration: defaults, a YAML file, ``JOBLEDGER_*`` variables, the command line.

``model.config.Config`` owns the values and their validation; this module owns where they
come from. Each layer overrides the one before it (file < environment < command line), and
every value keeps the name of the place it came from, so an error (and ``jobledger config
show``) can say which file line, variable or option to fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import attrs
import yaml

from model.config import Config
from model.errors import ConfigError

ENV_PREFIX = "JOBLEDGER_"
DEFAULT_SOURCE = "default"
COMMAND_LINE_SOURCE = "command line"

ENV_CONFIG_FILE = "JOBLEDGER_CONFIG"
NON_CONFIG_ENV = frozenset(
    {
        ENV_CONFIG_FILE,
        "JOBLEDGER_FAILPOINTS",
        "JOBLEDGER_FUZZ_SECONDS",
        "JOBLEDGER_FUZZ_SEED",
        "JOBLEDGER_FUZZ_BROKEN",
        "JOBLEDGER_TEST_PG",
    }
)
"""``JOBLEDGER_*`` variables that are not configuration keys but are still expected."""

_NONE_WORDS = frozenset({"", "none", "null", "~"})
_TRUE_WORDS = frozenset({"true", "yes", "on"})
_FALSE_WORDS = frozenset({"false", "no", "off"})


def env_var(key: str) -> str:
    """Return the environment variable that sets configuration ``key``."""
    return ENV_PREFIX + key.upper()


def _field_kind(key: str) -> tuple[str, bool]:
    """Return (base type name, whether None is accepted) of configuration ``key``.

    The annotations are strings (``from __future__ import annotations``), and Config only
    uses ``float``, ``int``, ``str`` and their ``| None`` forms, so reading the string is
    exact and avoids evaluating annotations at run time.
    """
    annotation = str(attrs.fields_dict(Config)[key].type)
    parts = [p.strip() for p in annotation.split("|")]
    optional = "None" in parts
    base = next(p for p in parts if p != "None")
    return base, optional


def _accepted(key: str) -> str:
    base, optional = _field_kind(key)
    words = {"float": "a number", "int": "an integer", "str": "a string"}
    text = words.get(base, base)
    return f"{text} or empty for none" if optional else text


def _coerce(key: str, value: object, *, source: str) -> object:
    """Return ``value`` converted to the type of ``key``; text is parsed (env, options).

    Raises:
        ConfigError: naming the key, the source and the accepted values.
    """
    base, optional = _field_kind(key)

    def bad() -> ConfigError:
        return ConfigError(
            f"{source}: {key} must be {_accepted(key)}, got {value!r}; fix the value or "
            "remove it to use the default"
        )

    if value is None:
        if optional:
            return None
        raise bad()
    if isinstance(value, str) and base != "str":
        text = value.strip()
        if optional and text.lower() in _NONE_WORDS:
            return None
        if text.lower() in _TRUE_WORDS | _FALSE_WORDS:
            raise bad()
        try:
            return int(text) if base == "int" else float(text)
        except ValueError:
            raise bad() from None
    if base == "str":
        if not isinstance(value, str):
            raise bad()
        if optional and value == "":
            return None
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad()
    if base == "int":
        if isinstance(value, float):
            if not value.is_integer():
                raise bad()
            return int(value)
        return value
    return float(value)


def _check_value(key: str, value: object, *, source: str) -> None:
    """Validate one value alone, so an error names the source that supplied it."""
    alone: dict[str, object] = {key: value}
    if key == "renew_every":
        # renew_every is also checked against lease_ttl, which another layer may set;
        # that relation is checked once every layer is merged.
        alone["lease_ttl"] = float("inf")
    try:
        Config(**alone)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}; remove it to use the default") from None


def _yaml_line(text: str, key: str) -> int | None:
    """Return the 1-based line of top-level ``key`` in a YAML mapping, if it can be found."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    if not isinstance(node, yaml.MappingNode):
        return None
    for key_node, _value_node in node.value:
        if getattr(key_node, "value", None) == key:
            return int(key_node.start_mark.line) + 1
    return None


def read_config_file(path: Path) -> dict[str, tuple[object, str]]:
    """Read a YAML configuration file into ``{key: (value, source)}``.

    The source of each value is ``"<path>:<line>"`` so errors point at the line.

    Raises:
        ConfigError: the file is missing or unreadable, is not valid YAML (naming the
            line), is not a flat mapping, or has an unknown key (naming key and file).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"configuration file {path} does not exist; create it or pass another --config"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(
            f"{where}: not valid YAML ({problem}); write one 'key: value' per line"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of configuration keys to values, found a "
            f"{type(data).__name__}; write one 'key: value' per line"
        )
    known = Config.keys()
    out: dict[str, tuple[object, str]] = {}
    for key, value in data.items():
        line = _yaml_line(text, str(key))
        where = f"{path}:{line}" if line is not None else str(path)
        if key not in known:
            raise ConfigError(
                f"{where}: unknown configuration key {key!r} in {path}; known keys: "
                f"{', '.join(known)}"
            )
        if isinstance(value, dict | list):
            raise ConfigError(
                f"{where}: {key} must be {_accepted(key)}, got a {type(value).__name__}; "
                "the configuration file is a flat mapping"
            )
        out[key] = (value, where)
    return out


def read_env(env: Mapping[str, str]) -> dict[str, tuple[object, str]]:
    """Read ``JOBLEDGER_<KEY>`` variables into ``{key: (text, variable name)}``.

    Raises:
        ConfigError: for a ``JOBLEDGER_*`` variable that is neither a configuration key
            nor one of :data:`NON_CONFIG_ENV`, naming the variable.
    """
    known = Config.keys()
    out: dict[str, tuple[object, str]] = {}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in NON_CONFIG_ENV:
            continue
        key = name.removeprefix(ENV_PREFIX).lower()
        if key not in known or env_var(key) != name:
            accepted = sorted([env_var(k) for k in known] + list(NON_CONFIG_ENV))
            raise ConfigError(
                f"unknown environment variable {name}: it is not a jobledger setting; "
                f"unset it or use one of {', '.join(accepted)}"
            )
        out[key] = (env[name], name)
    return out


def load_config(
    *,
    config_file: Path | None,
    env: Mapping[str, str],
    overrides: Mapping[str, object],
) -> tuple[Config, dict[str, str]]:
    """Build the effective configuration and say where each value came from.

    Layers, each overriding the one before: the defaults of :class:`Config`, the YAML
    file ``config_file`` (a flat mapping of keys to values), ``JOBLEDGER_<KEY>``
    environment variables in ``env`` (parsed to the key's type), and ``overrides`` from
    the command line (text is parsed like the environment's).

    Returns:
        The configuration, and for every key its source: ``"default"``, ``"<file>:<line>"``,
        the environment variable's name, or ``"command line"``.

    Raises:
        ConfigError: for an unknown key or variable, a wrong type, an impossible value or
            a broken file, naming the key, the source and the accepted values.
    """
    layers: list[dict[str, tuple[object, str]]] = []
    if config_file is not None:
        layers.append(read_config_file(config_file))
    layers.append(read_env(env))
    known = Config.keys()
    command_line: dict[str, tuple[object, str]] = {}
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(
                f"{COMMAND_LINE_SOURCE}: unknown configuration key {key!r}; known keys: "
                f"{', '.join(known)}"
            )
        command_line[key] = (value, COMMAND_LINE_SOURCE)
    layers.append(command_line)

    values: dict[str, object] = {}
    sources = dict.fromkeys(known, DEFAULT_SOURCE)
    for layer in layers:
        for key, (raw, source) in layer.items():
            value = _coerce(key, raw, source=source)
            _check_value(key, value, source=source)
            values[key] = value
            sources[key] = source
    try:
        config = Config(**values)  # type: ignore[arg-type]
    except ConfigError as exc:
        # Only rules that relate two keys get here; name every source that was set.
        involved = ", ".join(f"{k} from {sources[k]}" for k in known if k in str(exc))
        raise ConfigError(f"{exc} ({involved})") from None
    return config, sources


def default_config_file(cwd: Path) -> Path | None:
    """Return ``cwd/jobledger.yaml`` if it exists, the file used when none is named."""
    candidate = cwd / "jobledger.yaml"
    return candidate if candidate.is_file() else None
