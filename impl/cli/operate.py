"""Operator actions: ``reconcile``, ``retry`` and ``cancel``.

Each is one library call per job (``store.reconcile``, ``store.retry``, ``store.cancel``);
the store records the action in the job's history and fences out any worker still
holding the job.
"""

from __future__ import annotations

import click

from impl.cli import exit as exits
from impl.cli import output
from impl.cli.jobs import resolve_job_id
from impl.cli.session import Session, pass_session
from model.errors import JobledgerError, StorageError


@click.command()
@click.option("--dry-run", is_flag=True, help="Count what a pass would do; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@pass_session
def reconcile(session: Session, dry_run: bool, as_json: bool) -> None:
    """Run one reconcile pass and report it.

    Expires dead leases, marks their started effects in doubt, and fails jobs with no
    attempts left. Safe beside running workers."""
    with session.store() as store:
        report = store.reconcile(dry_run=dry_run)
    if as_json:
        out = output.plain(report)
        assert isinstance(out, dict)
        out["dry_run"] = dry_run
        output.print_json(out)
        return
    verb = "would" if dry_run else "did"
    click.echo(
        f"reconcile {verb}: expire {report.leases_expired} lease(s), mark "
        f"{report.effects_in_doubt} effect(s) in doubt, fail {report.jobs_failed} job(s)"
    )


@click.command()
@click.argument("job_ids", metavar="JOB_ID...", nargs=-1)
@click.option("--all-failed", is_flag=True, help="Retry every job in its workflow's failed state.")
@pass_session
def retry(session: Session, job_ids: tuple[str, ...], all_failed: bool) -> None:
    """Requeue failed jobs.

    Each goes back to the state it failed in with its attempts reset, and the retry
    is recorded in its history.

    Exits 2 if any JOB_ID is unknown or not failed (the others are still retried)."""
    if bool(job_ids) == all_failed:
        raise click.UsageError("give one or more JOB_IDs, or --all-failed (not both)")
    problems = 0
    done = 0
    with session.store() as store:
        if all_failed:
            targets = [
                job.job_id
                for workflow in store.workflows()
                for job in store.jobs(state=workflow.failed, kind=workflow.name)
            ]
        else:
            targets = list(job_ids)
        for text in targets:
            try:
                job_id = resolve_job_id(store, text)
                store.retry(job_id)
            except StorageError:
                raise
            except JobledgerError as exc:
                click.echo(f"error: {exits.one_line(exc)}", err=True)
                problems += 1
                continue
            done += 1
            click.echo(f"retried {output.short(job_id)}")
    click.echo(f"retried {done} job(s)")
    if problems:
        raise click.exceptions.Exit(exits.BAD_INPUT)


@click.command()
@click.argument("job_id")
@click.option("--reason", required=True, metavar="TEXT", help="Why; kept as the job's last error.")
@pass_session
def cancel(session: Session, job_id: str, reason: str) -> None:
    """Cancel a job, fencing out any worker holding it.

    The job enters its workflow's failed state with the reason as its last error; a
    worker still holding it loses its lease at its next call. Cancelling a failed job
    does nothing."""
    if not reason.strip():
        raise click.BadParameter("give a non-empty reason", param_hint="--reason")
    with session.store() as store:
        full = resolve_job_id(store, job_id)
        store.cancel(full, reason)
        state = store.state(full)
    click.echo(f"cancelled {output.short(full)}: now {state}")


def register(group: click.Group) -> None:
    """Add this module's commands to ``group``."""
    group.add_command(reconcile)
    group.add_command(retry)
    group.add_command(cancel)
