"""``jobledger selftest``: the multi-process crash fuzz, run on the user's own disk.

SQLite on a file system with broken locking (a network file system, some container
mounts) silently loses data; this command runs real worker processes there, kills them,
and checks the recorded history, so an operator can see for themselves.
"""

from __future__ import annotations

from pathlib import Path

import click

from impl import selftest as engine
from impl.cli import exit as exits
from impl.cli import output


@click.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path(),
    show_default="the current directory",
    help="Where the test database, histories and sink are written: the disk under test.",
)
@click.option(
    "--seconds",
    type=click.FloatRange(min=1.0),
    default=engine.SECONDS_DEFAULT,
    show_default=True,
    help="Seconds of crashes before the drain.",
)
@click.option("--seed", type=int, default=None, help="Replay a run: its random decisions.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=engine.WORKERS_DEFAULT,
    show_default=True,
    help="Worker processes kept running (and killed).",
)
@click.option(
    "--db",
    "db",
    metavar="URL",
    default=None,
    help="Run the ledger on PostgreSQL (postgresql://...) in a fresh schema that a passing "
    "run drops; default a SQLite file under --dir.",
)
@click.option("--keep", is_flag=True, help="Keep the run's folder even when it passes.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def selftest(
    *,
    directory: Path,
    seconds: float,
    seed: int | None,
    workers: int,
    db: str | None,
    keep: bool,
    as_json: bool,
) -> None:
    """Crash-test jobledger on this machine's disk and check the history.

    Starts worker processes on one database under --dir, SIGKILLs them at random
    moments and at failpoints, moves a simulated clock past lease TTLs, then drains and
    checks: no lost or unexpected job, every effect recorded once, no stale token
    accepted downstream, legal state sequences, increasing tokens, bounded time to
    finish. Exits 0 when the history is clean and 1 with the violations otherwise (the
    run's folder is then kept, with the command that reruns its seed).
    """
    directory.mkdir(parents=True, exist_ok=True)
    report = engine.run(directory, seconds=seconds, seed=seed, workers=workers, keep=keep, db=db)
    if as_json:
        output.print_json(report.as_dict())
    else:
        click.echo(report.render())
    if not report.ok:
        raise click.exceptions.Exit(exits.FAILED_JOBS)


def register(group: click.Group) -> None:
    """Add this module's commands to ``group``."""
    group.add_command(selftest)
