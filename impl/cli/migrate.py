"""``jobledger migrate [--check]``: bring a database's schema up to date, or say whether it is.

Opening a store applies pending migrations (each in its own transaction), so ``migrate``
is an explicit, reportable open. ``--check`` reads the recorded schema version without
writing anything, for deploy scripts: exit 0 when current, 1 when migrations are pending,
3 when the database is newer than this program or unusable.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import click

from impl.cli import exit as exits
from impl.cli.session import Session, pass_session, sqlite_path
from impl.sqlite import schema
from impl.sqlite.connection import translated
from model.config import Config
from model.errors import ConfigError


def sqlite_pending(path: Path, config: Config) -> list[tuple[int, str]]:
    """Return the migrations (version, name) that ``path`` lacks, writing nothing.

    A missing file lacks every migration.

    Raises:
        SchemaVersionError: the database is newer than this code.
        StorageError: the file is locked, corrupt or cannot be read.
    """
    if not path.exists():
        return [(m.version, m.name) for m in schema.MIGRATIONS]
    # A read-only URI connection: a check must not create WAL files or change the journal
    # mode of a database that a running program has open.
    uri = f"{path.resolve().as_uri()}?mode=ro"
    with translated(f"check migrations of {path}"):
        conn = sqlite3.connect(uri, uri=True, timeout=config.busy_timeout, isolation_level=None)
        try:
            version = schema.recorded_version(conn)
        finally:
            conn.close()
    schema.check_not_newer(version, str(path))
    return [(m.version, m.name) for m in schema.pending(version)]


@click.command()
@click.option("--check", is_flag=True, help="Change nothing; exit 1 if migrations are pending.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@pass_session
def migrate(session: Session, check: bool, as_json: bool) -> None:
    """Apply pending schema migrations, or check for them.

    Creates the database if it is missing. With --check nothing is written: exit 0 when
    the schema is current, 1 when migrations are pending."""
    target = session.target
    path = sqlite_path(target)
    if path is None:
        if check:
            raise ConfigError(
                f"migrate --check reads SQLite files; {target} is not one. Run "
                "`jobledger migrate` to apply the migrations of a PostgreSQL database"
            )
        with session.store(create=True):
            pass
        _print(as_json, target, applied=[], pending=[], check=False)
        return
    before = sqlite_pending(path, session.config)
    if check:
        _print(as_json, target, applied=[], pending=before, check=True)
        if before:
            raise click.exceptions.Exit(exits.PENDING_MIGRATIONS)
        return
    with session.store(create=True):
        pass
    after = sqlite_pending(path, session.config)
    applied = [m for m in before if m not in after]
    _print(as_json, target, applied=applied, pending=after, check=False)


def _print(
    as_json: bool,
    target: str,
    *,
    applied: list[tuple[int, str]],
    pending: list[tuple[int, str]],
    check: bool,
) -> None:
    if as_json:
        click.echo(
            json.dumps(
                {
                    "db": target,
                    "applied": [{"version": v, "name": n} for v, n in applied],
                    "pending": [{"version": v, "name": n} for v, n in pending],
                },
                indent=2,
            )
        )
        return
    for version, name in applied:
        click.echo(f"applied migration {version}: {name}")
    if check and pending:
        for version, name in pending:
            click.echo(f"pending migration {version}: {name}")
        click.echo(f"{target}: {len(pending)} migration(s) pending; run `jobledger migrate`")
    elif not pending:
        click.echo(f"{target}: schema is up to date")


def register(group: click.Group) -> None:
    """Add this module's commands to ``group``."""
    group.add_command(migrate)
