"""``jobledger selftest``: the crash fuzz, run on a directory of the user's choice.

The same multi-process fuzz the project's own test suite runs (see :mod:`impl.fuzz`):
worker processes on one SQLite file in ``directory``, SIGKILLed at random times and at
failpoints, a simulated clock that jumps past lease TTLs, then a drain and a
Jepsen-style history check. Run it on the disk or network file system you mean to use:
SQLite on a file system with broken locking loses data, and this shows it.

With ``db`` set to a ``postgresql://`` URL the ledger lives in a fresh schema on that
server instead (the sink and histories stay in ``directory``), and the run also
terminates random workers' sessions from the server side with ``pg_terminate_backend``.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from urllib.parse import urlsplit

from attrs import frozen

from impl.fuzz.engine import FuzzResult, FuzzSettings, run_fuzz

SECONDS_DEFAULT = 60.0
WORKERS_DEFAULT = 4


@frozen
class SelftestReport:
    """The figures and verdict of one selftest run, with the command that reruns it."""

    result: FuzzResult
    rerun: str

    @property
    def ok(self) -> bool:
        """True when the history check found no violation."""
        return self.result.ok

    def as_dict(self) -> dict[str, object]:
        """The report as plain JSON-ready data (for ``--json``)."""
        r = self.result
        return {
            "ok": r.ok,
            "seed": r.seed,
            "seconds": r.seconds,
            "runtime": round(r.runtime, 1),
            "workers": r.workers,
            "jobs": r.jobs,
            "by_state": dict(sorted(r.by_state.items())),
            "kills": r.kills,
            "kills_random": r.kills_random,
            "kills_failpoint": r.kills_failpoint,
            "workers_spawned": r.spawned,
            "clock_jumps": r.clock_jumps,
            "leases": r.leases,
            "leases_lost": r.leases_lost,
            "effects_recorded": r.effects,
            "effect_executions": r.executions,
            "reexecutions": r.reexecutions,
            "fenced_out": r.fenced_out,
            "in_doubt": r.in_doubt,
            "backend": r.backend,
            "disconnects": r.disconnects,
            "storage_errors": r.storage_errors,
            "torn_lines": r.torn_lines,
            "drain_steps": r.drain_steps,
            "liveness_steps": r.liveness_steps,
            "violations": [str(v) for v in r.violations],
            "kept": None if r.folder is None else str(r.folder),
            "schema_kept": r.schema_kept,
            "rerun": self.rerun,
        }

    def render(self, *, max_violations: int = 20) -> str:
        """The report for humans: the figures, then the verdict and what to do."""
        r = self.result
        states = ", ".join(f"{s} {n}" for s, n in sorted(r.by_state.items()))
        on = "" if r.backend == "sqlite" else f" on {r.backend}"
        lines = [
            f"jobledger crash fuzz{on}: seed {r.seed}, {r.workers} worker processes, "
            f"{r.runtime:.1f} s",
            f"  jobs          {r.jobs} planned; {states}",
            f"  kills         {r.kills} SIGKILLs ({r.kills_random} at random times, "
            f"{r.kills_failpoint} at failpoints); {r.spawned} workers started",
            f"  clock         {r.clock_jumps} jumps past the lease TTL",
            *(
                [
                    f"  disconnects   {r.disconnects} worker sessions terminated by the server "
                    f"(pg_terminate_backend); {r.storage_errors} handler calls failed with "
                    "StorageError and the workers went on"
                ]
                if r.backend != "sqlite"
                else []
            ),
            *(
                [
                    f"  prunes        {r.prunes} prunes while workers ran removed {r.pruned} "
                    "finished jobs (checked from their archive)"
                ]
                if r.prunes
                else []
            ),
            f"  leases        {r.leases} granted, {r.leases_lost} lost by their holder",
            f"  effects       {r.effects} recorded once each; {r.executions} executions; "
            f"{r.reexecutions} re-executed after a crash or lost lease (in-doubt retries); "
            f"{r.fenced_out} stale executions fenced out by the sink",
            f"  drain         every job terminal after {r.drain_steps} clock steps "
            f"(bound {r.liveness_steps})",
            f"  violations    {len(r.violations)}",
        ]
        for v in r.violations[:max_violations]:
            lines.append(f"    {v}")
        if len(r.violations) > max_violations:
            lines.append(f"    ... and {len(r.violations) - max_violations} more")
        if r.folder is not None:
            held = "database, histories, sink" if r.schema_kept is None else "histories, sink"
            lines.append(f"  kept          {r.folder} ({held})")
        if r.schema_kept is not None:
            lines.append(f"  kept ledger   {r.ledger}")
        if not r.ok:
            lines.append(f"  rerun         {self.rerun}")
            lines.append(
                "  (the seed replays every random decision; the operating system's timing "
                "differs from run to run)"
            )
        return "\n".join(lines)


def new_seed() -> int:
    """Return a fresh random seed for a run that was given none."""
    return int.from_bytes(os.urandom(4), "big")


def run(
    directory: Path,
    *,
    seconds: float = SECONDS_DEFAULT,
    seed: int | None = None,
    workers: int = WORKERS_DEFAULT,
    jobs: int | None = None,
    min_kills: int = 0,
    keep: bool = False,
    db: str | None = None,
) -> SelftestReport:
    """Run the crash fuzz in a new folder under ``directory`` and check its history.

    Args:
        directory: where the database, histories and sink are written (the file system
            under test). A new sub-folder is made; it is removed when the run passes
            and kept for inspection when it fails (or when ``keep`` is set).
        seconds: real seconds of crashes before the drain.
        seed: the seed of every random decision; default a fresh one (printed).
        workers: worker processes kept running.
        jobs: the most jobs to plan; default a steady backlog for the whole run.
        min_kills: go on past ``seconds`` (up to twice as long) until this many kills.
        keep: keep the run's folder even when it passes.
        db: None for a SQLite ledger in the run's folder, or a ``postgresql://`` URL:
            the ledger then lives in a fresh schema there (dropped when the run passes,
            kept and named in the report when it fails), and workers' sessions are
            also terminated from the server side.

    Returns:
        The report; ``report.ok`` is the verdict and ``report.render()`` the text.
    """
    used = new_seed() if seed is None else seed
    settings = FuzzSettings(
        seconds=seconds,
        seed=used,
        workers=workers,
        jobs=jobs,
        min_kills=min_kills,
        keep=keep,
        db=db,
    )
    result = run_fuzz(Path(directory), settings)
    rerun = (
        f"jobledger selftest --dir {shlex.quote(str(directory))} --seconds {seconds:g} "
        f"--seed {used}"
    )
    if workers != WORKERS_DEFAULT:
        rerun += f" --workers {workers}"
    if jobs is not None:
        rerun += f" --jobs {jobs}"
    if db is not None:
        rerun += f" --db {shlex.quote(without_password(db))}"
    return SelftestReport(result, rerun)


def without_password(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (for printed commands)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[-1]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()
