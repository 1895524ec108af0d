"""The root ``jobledger`` command: global options, the command tree, and error handling.

Every expected error (a :class:`~model.JobledgerError`) becomes one line on stderr and the
exit code from :mod:`impl.cli.exit`; ``--debug`` adds the traceback. Ctrl-C exits 130.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from impl import telemetry
from impl.cli import config as config_cmd
from impl.cli import download, jobs, metrics, migrate, operate, retention, selftest, status, worker
from impl.cli import exit as exits
from impl.cli.session import Session, StoreOpener, environment, parse_settings
from impl.config import ENV_CONFIG_FILE
from model.errors import JobledgerError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class JobledgerGroup(click.Group):
    """A click group that turns expected errors into one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command, mapping errors to the contract's exit codes."""
        try:
            return super().invoke(ctx)
        except JobledgerError as exc:
            _report(ctx, exc)
            raise click.exceptions.Exit(exits.exit_code(exc)) from exc
        except KeyboardInterrupt as exc:
            click.echo("interrupted", err=True)
            raise click.exceptions.Exit(exits.INTERRUPTED) from exc


def _report(ctx: click.Context, exc: BaseException) -> None:
    session = ctx.find_object(Session)
    if session is not None and session.debug:
        click.echo("".join(traceback.format_exception(exc)).rstrip(), err=True)
    click.echo(f"error: {exits.one_line(exc)}", err=True)


@click.group(cls=JobledgerGroup, context_settings=CONTEXT_SETTINGS)
@click.option(
    "--db",
    "db",
    metavar="TARGET",
    help="Database: a file path, sqlite:///path or postgresql://...  "
    "[default: JOBLEDGER_DB, else the config file's db, else ./jobledger.sqlite]",
)
@click.option(
    "--config",
    "config_file",
    metavar="FILE",
    envvar=ENV_CONFIG_FILE,
    type=click.Path(path_type=Path, dir_okay=False),
    help="YAML configuration file.  [default: JOBLEDGER_CONFIG, else ./jobledger.yaml if present]",
)
@click.option(
    "--set",
    "settings",
    metavar="KEY=VALUE",
    multiple=True,
    help="Override one configuration key (repeatable); wins over the file and JOBLEDGER_*.",
)
@click.option(
    "-v", "--verbose", count=True, help="Log jobledger events: -v for INFO, -vv for DEBUG."
)
@click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
@click.pass_context
def cli(
    ctx: click.Context,
    *,
    db: str | None,
    config_file: Path | None,
    settings: tuple[str, ...],
    verbose: int,
    debug: bool,
) -> None:
    """Durable jobs with leases, fencing tokens and exactly-once recorded effects.

    Inspect and steer a job ledger: what is queued, who holds what, what is in doubt,
    what failed and why. Exit codes: 0 success, 1 finished with failed jobs (or
    migrations pending), 2 bad usage or input, 3 database unusable, 130 interrupted.
    """
    opener: StoreOpener | None = ctx.obj if callable(ctx.obj) else None
    session = Session(
        db_option=db,
        config_option=config_file,
        settings=parse_settings(settings),
        debug=debug,
        env=environment(),
        cwd=Path.cwd(),
    )
    if opener is not None:
        session.opener = opener
    ctx.obj = session
    if verbose or debug:
        level = logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING
        try:
            log_format = session.config.log_format
        except JobledgerError:
            log_format = "text"
        telemetry.configure_logging(log_format=log_format, level=level)


for _module in (
    status,
    jobs,
    operate,
    retention,
    worker,
    metrics,
    migrate,
    config_cmd,
    download,
    selftest,
):
    _module.register(cli)


def main(argv: list[str] | None = None) -> None:
    """Run the ``jobledger`` command and exit with its code (the console script entry)."""
    try:
        cli.main(args=argv, prog_name="jobledger")
    except KeyboardInterrupt:
        # Ctrl-C while click itself is parsing, before any command runs.
        click.echo("interrupted", err=True)
        sys.exit(exits.INTERRUPTED)
