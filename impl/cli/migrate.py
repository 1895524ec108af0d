"""``jobledger migrate [--check]``: bring a database's schema up to date, or say whether it is.

Opening a store applies pending migrations (each in its own transaction), so ``migrate``
is an explicit, reportable open. ``--check`` reads the recorded schema version (of a
SQLite file, or of the PostgreSQL schema ``postgres_schema``) without writing anything, for
deploy scripts: exit 0 when current, 1 when migrations are pending, 3 when the database is
newer than this program or unusable.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import click

from impl.cli import exit as exits
from impl.cli.session import Session, pass_session, sqlite_path
from impl.sqlite import schema
from impl.sqlite.connection import translated
from model.config import Config
from model.errors import ConfigError

POSTGRES_PREFIXES = ("postgresql://", "postgres://")


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


def postgres_pending(url: str, config: Config) -> list[tuple[int, str]]:
    """Return the migrations (version, name) that the schema at ``url`` lacks, writing nothing.

    The schema is ``config.postgres_schema``; a missing one lacks every migration.

    Raises:
        SchemaVersionError: the schema is newer than this code.
        StorageError: the server cannot be reached.
    """
    # Imported here so that psycopg is needed only by PostgreSQL users.
    from impl.postgres.store import pending_migrations  # noqa: PLC0415

    return pending_migrations(url, config=config)


def _pending(target: str, config: Config) -> list[tuple[int, str]] | None:
    """Return what ``target`` lacks, or None for a target without a schema (memory)."""
    path = sqlite_path(target)
    if path is not None:
        return sqlite_pending(path, config)
    if target.startswith(POSTGRES_PREFIXES):
        return postgres_pending(target, config)
    return None


@click.command()
@click.option("--check", is_flag=True, help="Change nothing; exit 1 if migrations are pending.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@pass_session
def migrate(session: Session, check: bool, as_json: bool) -> None:
    """Apply pending schema migrations, or check for them.

    Creates the database (or the PostgreSQL schema, postgres_schema) if it is missing.
    With --check nothing is written: exit 0 when the schema is current, 1 when
    migrations are pending, 3 when it is newer than this program."""
    target = session.target
    shown = redact(target)
    schema_name = session.config.postgres_schema if target.startswith(POSTGRES_PREFIXES) else None
    before = _pending(target, session.config)
    if before is None:
        if check:
            raise ConfigError(
                f"migrate --check reads SQLite files and PostgreSQL schemas; {shown} has no "
                "schema to check. Pass --db FILE or --db postgresql://..."
            )
        with session.store(create=True):
            pass
        _print(as_json, shown, None, applied=[], pending=[], check=False)
        return
    if check:
        _print(as_json, shown, schema_name, applied=[], pending=before, check=True)
        if before:
            raise click.exceptions.Exit(exits.PENDING_MIGRATIONS)
        return
    with session.store(create=True):
        pass
    after = _pending(target, session.config) or []
    applied = [m for m in before if m not in after]
    _print(as_json, shown, schema_name, applied=applied, pending=after, check=False)


def redact(target: str) -> str:
    """Return ``target`` without the password a PostgreSQL URL may carry, for output."""
    if not target.startswith(POSTGRES_PREFIXES):
        return target
    parts = urlsplit(target)
    if parts.password is None:
        return target
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _print(
    as_json: bool,
    target: str,
    schema_name: str | None,
    *,
    applied: list[tuple[int, str]],
    pending: list[tuple[int, str]],
    check: bool,
) -> None:
    if as_json:
        out: dict[str, object] = {"db": target}
        if schema_name is not None:
            out["schema"] = schema_name
        out["applied"] = [{"version": v, "name": n} for v, n in applied]
        out["pending"] = [{"version": v, "name": n} for v, n in pending]
        click.echo(json.dumps(out, indent=2))
        return
    if schema_name is not None:
        target = f"{target} schema {schema_name!r}"
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
