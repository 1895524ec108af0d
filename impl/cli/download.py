"""``jobledger download`` and ``jobledger demo``: the download pipeline's commands.

The work is :func:`impl.download.run.download`; this module draws its progress (a rich
bar on stderr when stderr is a terminal, wait messages always) and prints the summary.
Workers are threads of this one process (``--workers N`` handler threads sharing one
HTTP client), so the per-host limit holds across them.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from impl.cli import output
from impl.cli.session import Session, pass_session
from impl.world import LEDGER, EnvironmentFault

if TYPE_CHECKING:
    from impl.download import run as download_run

WAIT_REPEAT_SECONDS = 5.0
"""A wait message that does not change is printed again at most this often."""


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


class _Display:
    """Turns the pipeline's progress callbacks into a rich display (thread-safe)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[received]}"),
            console=console,
            disable=not console.is_terminal,
        )
        self.jobs_task = self.bar.add_task("jobs", total=None, received="")
        self._lock = threading.Lock()
        self._bytes = 0
        self._started = time.monotonic()
        self._said: dict[str, float] = {}

    def on_start(self, total: int) -> None:
        self.bar.update(self.jobs_task, total=total)

    def on_jobs(self, done: int, total: int) -> None:
        self.bar.update(self.jobs_task, completed=done, total=total)

    def on_bytes(self, n: int) -> None:
        with self._lock:
            self._bytes += n
            total = self._bytes
        rate = total / max(time.monotonic() - self._started, 1e-3)
        self.bar.update(self.jobs_task, received=f"{_size(total)} at {_size(int(rate))}/s")

    def on_wait(self, message: str, _seconds_left: float | None) -> None:
        # The message carries a countdown; key on its job so one wait prints once a while.
        key = message.split(" is ", 1)[0]
        now = time.monotonic()
        with self._lock:
            if now - self._said.get(key, -WAIT_REPEAT_SECONDS) < WAIT_REPEAT_SECONDS:
                return
            self._said[key] = now
        self.console.print(f"waiting: {message}")

    def progress(self) -> download_run.Progress:
        # Imported here: the pipeline pulls in httpx, which every other command can skip.
        from impl.download.run import Progress  # noqa: PLC0415

        return Progress(
            on_start=self.on_start,
            on_jobs=self.on_jobs,
            on_bytes=self.on_bytes,
            on_wait=self.on_wait,
        )


@click.command()
@click.argument("manifest", type=click.Path(path_type=Path, dir_okay=False), metavar="MANIFEST")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    metavar="DIR",
    help="Output directory (content-addressed store and index); created if missing.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    metavar="N",
    help="Handler threads of the one worker this process runs, and connections per host "
    "(unless download_per_host is set lower: then the summary says it held the run back; "
    "raise it with --set download_per_host=N).",
)
@click.option(
    "--skip-invalid", is_flag=True, help="Plan the valid manifest lines and list the bad ones."
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@pass_session
def download(
    session: Session,
    *,
    manifest: Path,
    out_dir: Path,
    workers: int,
    skip_invalid: bool,
    as_json: bool,
) -> None:
    """Download every artifact of MANIFEST into DIR, resumably.

    MANIFEST is JSON Lines ({"work_id", "artifact_id", "url"} per line) or a plain list
    of URLs (one per line; blank lines and # comments skipped). One job is planned per
    entry and workers run until every job is terminal. Run it again after any crash or
    Ctrl-C: finished artifacts are not fetched again and partial files resume. Exits 1
    when some artifacts failed, 130 when interrupted, 4 when the machine refused a write
    (disk full, read-only file system or ledger, no file handles): the run stops with one
    line saying what to fix, spends no attempt and keeps every byte; run it again after."""
    from impl.download.run import download as run_download  # noqa: PLC0415 - see progress()

    display = _Display(Console(stderr=True, highlight=False))
    try:
        with session.store(create=True) as store, display.bar:
            summary = run_download(
                store,
                manifest,
                out_dir,
                workers=workers,
                config=session.config,
                progress=display.progress(),
                skip_invalid=skip_invalid,
            )
    except EnvironmentFault as exc:
        if exc.fault.path != LEDGER:
            raise
        # The pipeline knows the store, not where it lives: name the database.
        raise EnvironmentFault(attrs.evolve(exc.fault, path=session.target)) from exc
    if as_json:
        data = output.plain(summary)
        assert isinstance(data, dict)
        data["ok"] = summary.ok
        output.print_json(data)
    else:
        _print_summary(summary)
    if summary.exit_code:
        raise click.exceptions.Exit(summary.exit_code)


def _print_summary(summary: download_run.DownloadSummary) -> None:
    con = output.console()
    con.print(
        f"{summary.total} artifact(s): {summary.succeeded} downloaded, {summary.deduped} "
        f"deduplicated, {summary.skipped} skipped as duplicates, {summary.failed} failed, "
        f"{summary.pending} pending"
    )
    con.print(
        f"{summary.bytes_received} bytes received, {summary.bytes_resumed} resumed, "
        f"{summary.bytes_stored} stored in {summary.out_dir} ({output.duration(summary.elapsed)})"
    )
    con.print(f"index: {summary.index_path}")
    for line in host_lines(summary):
        con.print(line)
    for text in summary.invalid:
        con.print(f"skipped manifest line: {text}")
    if summary.failures:
        table = output.table("job", "artifact", "url", "error", title="failed")
        for failure in summary.failures:
            table.add_row(
                output.short(failure.job_id),
                failure.artifact_id,
                failure.url,
                output.clip(failure.error, 80),
            )
        con.print(table)
        con.print("retry them with `jobledger retry --all-failed` and run download again")


def host_lines(summary: download_run.DownloadSummary) -> list[str]:
    """The summary's lines about hosts: skipped (down), recovered, throttled, and the
    per-host limit when it held the run below ``--workers``."""
    lines = []
    for h in summary.hosts:
        if h.state != "closed":
            lines.append(
                f"skipped host {h.host}: circuit open after {h.failures} failure(s) in a row "
                f"(last: {h.last_error}); {h.deferred} time(s) a job was handed back without "
                "an attempt; its jobs are pending: run the same command again when it is back"
            )
        elif h.opens:
            lines.append(
                f"host {h.host} was down for a while: its circuit opened {h.opens} time(s), "
                f"jobs handed back {h.deferred} time(s) without an attempt; it answers again"
            )
        if h.throttled:
            lines.append(
                f"host {h.host} asked to slow down {h.throttled} time(s) (429, or 503 with "
                "Retry-After): every request to it waited as asked"
            )
    if summary.per_host and summary.per_host < summary.workers:
        lines.append(
            f"note: at most {summary.per_host} connection(s) per host (download_per_host) "
            f"held the run below --workers {summary.workers}; raise it with "
            f"--set download_per_host={summary.workers}"
        )
    return lines


@click.command()
@click.option(
    "--dir",
    "workdir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("jobledger-demo"),
    show_default=True,
    metavar="DIR",
    help="Where the demo keeps its ledger, manifest and downloads (for inspection).",
)
@click.option("--files", type=click.IntRange(min=1), default=6, show_default=True, metavar="N")
@click.option(
    "--size",
    type=click.IntRange(min=1),
    default=2 * 1024 * 1024,
    show_default=True,
    metavar="BYTES",
    help="Bytes per generated file.",
)
@click.option(
    "--kills",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    metavar="N",
    help="Rounds of worker processes killed mid-stream.",
)
@click.option(
    "--rate",
    type=click.IntRange(min=1),
    default=1024 * 1024,
    show_default=True,
    metavar="BYTES",
    help="Bytes per second the local server sends per connection.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def demo(*, workdir: Path, files: int, size: int, kills: int, rate: int, as_json: bool) -> None:
    """Crash a download on purpose, resume it, and prove nothing was lost.

    Serves generated files from a local server (nothing touches the internet), SIGKILLs
    worker processes mid-stream a few times, then finishes the download and checks every
    file's SHA-256. Uses its own ledger in DIR (--db does not apply). Exits 1 if any file
    is missing or corrupt."""
    from impl.download.demo import run_demo  # noqa: PLC0415 - see _Display.progress

    err = Console(stderr=True, highlight=False)
    report = run_demo(workdir, files=files, size=size, kills=kills, rate=rate, say=err.print)
    if as_json:
        data = output.plain(report)
        assert isinstance(data, dict)
        data["ok"] = report.ok
        output.print_json(data)
    else:
        output.console().print(
            f"{report.verified}/{report.files} files verified by SHA-256 after "
            f"{report.processes_killed} worker processes were killed; "
            f"{report.bytes_resumed} bytes resumed with {report.ranged_requests} ranged "
            f"requests; {report.duplicates_avoided} duplicates avoided; ledger and files "
            f"in {report.workdir}"
        )
    if not report.ok:
        raise click.exceptions.Exit(1)


def register(group: click.Group) -> None:
    """Add this module's commands to ``group``."""
    group.add_command(download)
    group.add_command(demo)
