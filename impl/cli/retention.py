"""``jobledger prune``: remove finished jobs, keeping their keys (CONTRACT section 7).

One library call, ``store.prune``, which removes the jobs in short batches so workers
keep running. ``--archive FILE`` appends every removed job to FILE as one JSON line (the
object ``show --json`` prints) and fsyncs it before the batch's delete commits, so a job
is never gone from both the ledger and the archive. Progress goes to stderr at most once
a second on long runs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import click

from impl.cli import output
from impl.cli.jobs import job_json
from impl.cli.session import Session, pass_session
from model.errors import InvalidInput
from model.retention import PrunedJob, PruneReport, parse_age

PROGRESS_EVERY = 1.0
"""Seconds between two progress lines on stderr."""


class ArchiveError(InvalidInput):
    """The archive file cannot be written (the batch it was for was not deleted)."""


class Archive:
    """Appends pruned jobs to a JSON Lines file, fsynced before each batch's delete."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written = 0
        try:
            new = not path.exists()
            self._file: IO[str] = path.open("a", encoding="utf-8")
            if new:
                # The file's name must survive a crash too, not only its contents.
                _fsync_dir(path.parent)
        except OSError as exc:
            raise ArchiveError(
                f"prune --archive {path}: cannot open the archive for appending "
                f"({exc.strerror or exc}); nothing was pruned: choose a writable file"
            ) from exc

    def __call__(self, jobs: Sequence[PrunedJob]) -> None:
        """Write and fsync ``jobs``; raise :class:`ArchiveError` if that fails."""
        lines = "".join(
            json.dumps(job_json(p.job, p.effects, p.history), ensure_ascii=False) + "\n"
            for p in jobs
        )
        try:
            self._file.write(lines)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise self._error(exc) from exc
        self.written += len(jobs)

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def _error(self, exc: OSError) -> ArchiveError:
        return ArchiveError(
            f"prune --archive {self.path}: cannot write the archive ({exc.strerror or exc}); "
            f"the batch it was for was not deleted ({self.written} job(s) archived and "
            "pruned before it); free space or choose another file, then run prune again"
        )


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Progress:
    """Prints the running totals to stderr, at most once per :data:`PROGRESS_EVERY`."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self.printed = False

    def __call__(self, report: PruneReport) -> None:
        now = time.monotonic()
        if now - self._last < PROGRESS_EVERY:
            return
        self._last = now
        self.printed = True
        click.echo(
            f"pruned {report.jobs} job(s) so far in {report.batches} batch(es)"
            + (f", forgot {report.forgotten} key(s)" if report.forgotten else ""),
            err=True,
        )


@click.command()
@click.option(
    "--finished-before",
    "age",
    required=True,
    metavar="AGE",
    help="Prune jobs that finished longer ago than AGE: 30d, 12h, 15m, 90s, 2w, 0s.",
)
@click.option("--dry-run", is_flag=True, help="Count what would be pruned; change nothing.")
@click.option("--keep-failed", is_flag=True, help="Keep jobs in their workflow's failed state.")
@click.option(
    "--archive",
    "archive_path",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Append each pruned job to FILE as a JSON line (as show --json prints it), "
    "fsynced before it is deleted.",
)
@click.option(
    "--forget-keys",
    is_flag=True,
    help="Keep no tombstones: planning a pruned identity again then plans a new job. "
    "Also forgets the keys of earlier prunes that finished before AGE.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@pass_session
def prune(
    session: Session,
    *,
    age: str,
    dry_run: bool,
    keep_failed: bool,
    archive_path: Path | None,
    forget_keys: bool,
    as_json: bool,
) -> None:
    """Remove finished jobs, their effects and their history.

    Jobs in a terminal state whose last change is older than AGE go, in short batches
    (workers keep running meanwhile). Each leaves a tombstone of its key, so planning
    the same identity again changes nothing, and `show` says when it was pruned; with
    --forget-keys no tombstone is kept. Circuit breaker rows (see `status`) last changed
    before AGE go too. On SQLite the freed pages are then given back to
    the file system (files created by jobledger 0.1 before retention: see
    specs/009-retention.md for the one-time VACUUM)."""
    seconds = parse_age(age)
    archive = None if archive_path is None or dry_run else Archive(archive_path)
    progress = Progress()
    try:
        with session.store() as store:
            cutoff = store.now() - seconds
            report = store.prune(
                finished_before=cutoff,
                keep_failed=keep_failed,
                forget_keys=forget_keys,
                dry_run=dry_run,
                archive=archive,
                progress=progress,
            )
            # Breaker rows (model/breaker.py) last changed before the same cutoff go too.
            if dry_run:
                breakers = sum(1 for row in store.breakers() if row.changed_at < cutoff)
            else:
                breakers = store.forget_breakers(changed_before=cutoff)
    finally:
        if archive is not None:
            archive.close()
    if as_json:
        out = output.plain(report)
        assert isinstance(out, dict)
        out["dry_run"] = dry_run
        out["finished_before"] = cutoff
        out["archive"] = None if archive_path is None or dry_run else str(archive_path)
        out["breakers_forgotten"] = breakers
        output.print_json(out)
        return
    verb = "would prune" if dry_run else "pruned"
    keys = (
        "no keys kept (--forget-keys)"
        if forget_keys
        else f"{report.tombstones} key(s) kept as tombstones"
    )
    click.echo(
        f"{verb} {report.jobs} job(s) finished before {output.when(cutoff)} and "
        f"{report.effects} effect(s); {keys}"
        + (f"; forgot {report.forgotten} older key(s)" if report.forgotten else "")
        + ("" if dry_run else f"; {report.batches} batch(es)")
        + (f"; archived to {archive_path}" if archive is not None else "")
        + (f"; {verb} {breakers} circuit breaker row(s)" if breakers else "")
    )


def register(group: click.Group) -> None:
    """Add this module's commands to ``group``."""
    group.add_command(prune)
