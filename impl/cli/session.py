"""One invocation's settings: the configuration, the database target, and opening the store.

The global options only record what was asked; the configuration is loaded the first time
a command needs it, so ``jobledger CMD --help`` works even when the configuration is broken.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import click
from attrs import define, field

from impl.config import COMMAND_LINE_SOURCE, DEFAULT_SOURCE, default_config_file, load_config
from impl.store import open_store
from model.config import Config
from model.errors import ConfigError, StorageError
from model.store import Store

DEFAULT_DB = "jobledger.sqlite"
"""The database used when neither ``--db``, ``JOBLEDGER_DB`` nor the config file names one."""

StoreOpener = Callable[[str, Config], Store]


def _open_store(target: str, config: Config) -> Store:
    return open_store(target, config=config)


def sqlite_path(target: str) -> Path | None:
    """Return the file a SQLite target names, or None for PostgreSQL and memory targets."""
    if target.startswith(("postgresql://", "postgres://", "memory:")):
        return None
    if target == ":memory:":
        return None
    if target.startswith("sqlite://"):
        return Path(target.removeprefix("sqlite://"))
    if "://" in target:
        return None
    return Path(target)


@define
class Session:
    """What every command needs: configuration, database target, a way to open the store."""

    db_option: str | None
    config_option: Path | None
    settings: dict[str, str]
    debug: bool
    env: Mapping[str, str]
    cwd: Path
    opener: StoreOpener = _open_store
    _loaded: tuple[Config, dict[str, str]] | None = field(default=None, init=False)

    @property
    def config_file(self) -> Path | None:
        """The configuration file: ``--config``, ``JOBLEDGER_CONFIG`` or ./jobledger.yaml."""
        if self.config_option is not None:
            return self.config_option
        return default_config_file(self.cwd)

    def load(self) -> tuple[Config, dict[str, str]]:
        """Load (once) and return the configuration and the source of each value.

        Raises:
            ConfigError: for a broken configuration file, variable or option.
        """
        if self._loaded is None:
            overrides: dict[str, object] = dict(self.settings)
            if self.db_option is not None:
                overrides["db"] = self.db_option
            self._loaded = load_config(
                config_file=self.config_file, env=self.env, overrides=overrides
            )
        return self._loaded

    @property
    def config(self) -> Config:
        """The effective configuration."""
        return self.load()[0]

    @property
    def target(self) -> str:
        """The database: ``--db``, ``JOBLEDGER_DB``, the file's ``db``, or the default."""
        config = self.config
        return config.db if config.db else DEFAULT_DB

    @property
    def target_source(self) -> str:
        """Where :attr:`target` came from."""
        config, sources = self.load()
        if not config.db:
            return DEFAULT_SOURCE
        source = sources["db"]
        return "--db" if source == COMMAND_LINE_SOURCE else source

    @contextmanager
    def store(self, *, create: bool = False) -> Iterator[Store]:
        """Open the store for one command and close it afterwards.

        Args:
            create: create (and migrate) a missing SQLite database. Commands that only
                read or steer existing jobs pass False, so a mistyped path is reported
                instead of silently creating an empty database.

        Raises:
            StorageError: the database is missing (when not ``create``) or unusable.
        """
        target = self.target
        path = sqlite_path(target)
        if not create and path is not None and not path.exists():
            raise StorageError(
                f"no database at {path} (from {self.target_source}); run a command that "
                "plans jobs or `jobledger migrate` to create it, or pass --db"
            )
        if path is not None and path.is_dir():
            raise StorageError(f"{path} is a directory, not a database file; pass --db FILE")
        store = self.opener(target, self.config)
        try:
            yield store
        finally:
            store.close()


def parse_settings(values: tuple[str, ...]) -> dict[str, str]:
    """Parse ``--set KEY=VALUE`` options into a mapping.

    Raises:
        click.BadParameter: for an item without ``=``.
    """
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(
                f"{item!r} is not KEY=VALUE (for example lease_ttl=60)", param_hint="--set"
            )
        out[key.strip()] = value
    return out


def session_from(ctx: click.Context) -> Session:
    """Return the session the root command stored in the click context."""
    session = ctx.find_object(Session)
    if session is None:
        raise ConfigError("internal: the jobledger root command did not set up a session")
    return session


pass_session = click.make_pass_decorator(Session)
"""Decorator giving a command its :class:`Session` as first argument."""


def environment() -> dict[str, str]:
    """Return a copy of the process environment (a seam for tests)."""
    return dict(os.environ)
