"""``jobledger status`` and ``jobledger leases``: the health of the whole ledger at a glance."""

from __future__ import annotations

import click

from impl.cli import output
from impl.cli.session import Session, pass_session
from model.record import LeaseRow, Stats


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the Stats fields as one JSON object.")
@pass_session
def status(session: Session, as_json: bool) -> None:
    """Show counts by kind and state, leases, in-doubt effects, failures.

    Also the queue lag: the age of the oldest eligible job."""
    with session.store() as store:
        stats = store.stats()
    if as_json:
        output.print_json(stats)
        return
    _print_stats(stats)


def _print_stats(stats: Stats) -> None:
    con = output.console()
    counts = output.table("kind", "state", "jobs")
    rows = 0
    for kind in sorted(stats.by_state):
        for state, count in stats.by_state[kind].items():
            if count:
                counts.add_row(kind, state, str(count))
                rows += 1
    if rows:
        con.print(counts)
    else:
        con.print("no jobs")
    con.print(
        f"leases: {stats.leases_live} live, {stats.leases_expired} expired   "
        f"in doubt: {stats.in_doubt}   failed: {stats.failed}   "
        f"queue lag: {output.duration(stats.oldest_eligible_age)}"
    )
    if stats.leases_expired or stats.in_doubt:
        con.print("run `jobledger reconcile` to expire dead leases and mark their effects in doubt")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of leases.")
@pass_session
def leases(session: Session, as_json: bool) -> None:
    """List live and expired leases.

    For each: job, kind, state, worker, token, and time left. Expired leases stay
    listed until a worker takes the job over or `jobledger reconcile` clears them."""
    with session.store() as store:
        rows = store.leases()
        # Lease times are in the store's clock (the server's, on PostgreSQL), not ours.
        now = store.now()
    if as_json:
        output.print_json([_lease_json(row, now) for row in rows])
        return
    if not rows:
        output.console().print("no leases")
        return
    out = output.table("job", "kind", "state", "worker", "token", "time left")
    for row in rows:
        out.add_row(
            output.short(row.job_id),
            row.kind,
            row.state,
            row.worker,
            str(row.token),
            _left(row, now),
        )
    output.console().print(out)


def _left(row: LeaseRow, now: float) -> str:
    # ``live`` was judged when the rows were read, a moment before ``now``: trust it, so a
    # lease never shows as live with time gone, nor expired with time left.
    if row.live:
        return output.time_left(row.expires_at, now=min(now, row.expires_at - 1e-3))
    return output.time_left(row.expires_at, now=max(now, row.expires_at))


def _lease_json(row: LeaseRow, now: float) -> dict[str, object]:
    out = output.plain(row)
    assert isinstance(out, dict)
    out["seconds_left"] = round(max(row.expires_at - now, 0.0), 3) if row.live else 0.0
    return out


def register(group: click.Group) -> None:
    """Add this module's commands to ``group``."""
    group.add_command(status)
    group.add_command(leases)
