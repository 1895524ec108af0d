"""``jobledger jobs`` and ``jobledger show``: listing jobs and looking into one.

Job ids are 64 hex characters; every command that takes one also accepts a unique
prefix (tables print the first 12 characters).
"""

from __future__ import annotations

from collections.abc import Sequence

import click
from rich.table import Table

from impl.cli import output
from impl.cli.session import Session, pass_session
from model.errors import InvalidInput, UnknownJob
from model.record import EffectInfo, HistoryEvent, JobInfo
from model.store import Store

JOB_ID_LENGTH = 64
_HEX = frozenset("0123456789abcdef")


def resolve_job_id(store: Store, text: str) -> str:
    """Return the full job id for ``text``: a full id, or a unique prefix of one.

    A prefix is looked up by listing jobs, which reads the whole jobs table; pass the full
    id in scripts.

    Raises:
        InvalidInput: ``text`` is not hex, or the prefix matches more than one job.
        UnknownJob: no job has that id or prefix.
    """
    job_id = text.strip().lower()
    if not job_id or not set(job_id) <= _HEX or len(job_id) > JOB_ID_LENGTH:
        raise InvalidInput(
            f"{text!r} is not a job id: expected up to {JOB_ID_LENGTH} hex characters "
            "(as `jobledger jobs` prints)"
        )
    if len(job_id) == JOB_ID_LENGTH:
        return job_id
    matches = [job.job_id for job in store.jobs() if job.job_id.startswith(job_id)]
    if not matches:
        raise UnknownJob(job_id)
    if len(matches) > 1:
        raise InvalidInput(
            f"job id prefix {job_id!r} matches {len(matches)} jobs; give more characters"
        )
    return matches[0]


@click.command(name="jobs")
@click.option("--state", "state", metavar="S", help="Only jobs in state S.")
@click.option("--kind", "kind", metavar="K", help="Only jobs of kind K.")
@click.option(
    "--limit",
    "limit",
    metavar="N",
    type=click.IntRange(min=1),
    help="At most N jobs.",
)
@click.option("--newest", is_flag=True, help="Newest first (default: oldest first, as planned).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of job objects.")
@pass_session
def jobs_command(
    session: Session,
    *,
    state: str | None,
    kind: str | None,
    limit: int | None,
    newest: bool,
    as_json: bool,
) -> None:
    """List jobs, oldest first, optionally filtered by state and kind."""
    with session.store() as store:
        found = store.jobs(state=state, kind=kind, limit=limit, newest_first=newest)
    if as_json:
        output.print_json(found)
        return
    if not found:
        output.console().print("no jobs")
        return
    out = output.table("job", "kind", "state", "attempts", "worker", "updated", "last error")
    for job in found:
        out.add_row(
            output.short(job.job_id),
            job.kind,
            job.state,
            f"{job.attempts}/{job.max_attempts}",
            job.lease.worker if job.lease is not None else "-",
            output.when(job.updated_at),
            output.clip(job.last_error, 50),
        )
    output.console().print(out)


@click.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON job object.")
@pass_session
def show(session: Session, job_id: str, as_json: bool) -> None:
    """Show one job in full.

    Identity, payload, state, attempts, lease, effects with their results, errors,
    and the job's history. JOB_ID is the full id or a unique prefix."""
    with session.store() as store:
        full = resolve_job_id(store, job_id)
        job = store.job(full)
        effects = store.effects(full)
        history = store.history(full)
        # Lease times are in the store's clock (the server's, on PostgreSQL), not ours.
        now = store.now()
    if as_json:
        output.print_json(job_json(job, effects, history))
        return
    _print_job(job, effects, history, now)


def job_json(
    job: JobInfo, effects: Sequence[EffectInfo], history: Sequence[HistoryEvent]
) -> dict[str, object]:
    """One job object as ``show --json`` prints it (and ``prune --archive`` keeps it)."""
    out = output.plain(job)
    assert isinstance(out, dict)
    out["effects"] = [_effect_json(e) for e in effects]
    out["history"] = [output.plain(h) for h in history]
    return out


def _effect_json(effect: EffectInfo) -> dict[str, object]:
    return {
        "op": effect.op,
        "op_key": effect.op_key,
        "status": effect.status.value,
        "result": output.plain(effect.result),
        "started_at": effect.started_at,
        "finished_at": effect.finished_at,
        "token": effect.token,
        "started_by": effect.started_by,
        "extras": output.plain(effect.extras),
    }


def _print_job(
    job: JobInfo, effects: list[EffectInfo], history: list[HistoryEvent], now: float
) -> None:
    con = output.console()
    facts = output.table("field", "value")
    facts.add_row("job", job.job_id)
    facts.add_row("kind", job.kind)
    facts.add_row("identity", output.compact(job.identity, 200))
    facts.add_row("payload", output.compact(job.payload, 200))
    failed_from = f" (failed in {job.failed_from})" if job.failed_from else ""
    facts.add_row("state", job.state + failed_from)
    facts.add_row("attempts", f"{job.attempts} of {job.max_attempts}")
    facts.add_row("priority", str(job.priority))
    facts.add_row("run at", output.when(job.run_at))
    facts.add_row("token", str(job.token))
    if job.lease is not None:
        left = output.time_left(job.lease.expires_at, now=now)
        lease = f"{job.lease.worker}, token {job.lease.token}, {left}"
    elif job.lease_worker is not None:
        lease = f"{job.lease_worker} (expired at {output.when(job.lease_expires_at)})"
    else:
        lease = "-"
    facts.add_row("lease", lease)
    facts.add_row("last error", job.last_error or "-")
    facts.add_row("created", output.when(job.created_at))
    facts.add_row("updated", output.when(job.updated_at))
    parts: list[Table] = [facts]
    if effects:
        table = output.table(
            "op", "status", "token", "by", "started", "finished", "result", title="effects"
        )
        for effect in effects:
            table.add_row(
                effect.op,
                effect.status.value,
                str(effect.token),
                effect.started_by,
                output.when(effect.started_at, precise=True),
                output.when(effect.finished_at, precise=True),
                output.compact(effect.result, 60) if effect.finished_at is not None else "-",
            )
        parts.append(table)
    if history:
        table = output.table("at", "event", "token", "worker", "detail", title="history")
        for event in history:
            table.add_row(
                output.when(event.at, precise=True),
                event.event.value,
                str(event.token),
                event.worker or "-",
                " ".join(f"{k}={v}" for k, v in event.detail.items()),
            )
        parts.append(table)
    for part in parts:
        con.print()
        con.print(part)


def register(group: click.Group) -> None:
    """Add this module's commands to ``group``."""
    group.add_command(jobs_command)
    group.add_command(show)
