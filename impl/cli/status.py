"""``jobledger status`` and ``jobledger leases``: the health of the whole ledger at a glance."""

from __future__ import annotations

import click

from impl.cli import output
from impl.cli.session import Session, pass_session
from model.breaker import BREAKER_RECENT_SECONDS, BreakerMove, BreakerRow
from model.record import LeaseRow, Stats


@click.command()
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the Stats fields and `breakers` (a list) as one JSON object.",
)
@pass_session
def status(session: Session, as_json: bool) -> None:
    """Show counts by kind and state, leases, in-doubt effects, failures.

    Also the queue lag (the age of the oldest eligible job) and the circuit breakers
    that download runs recorded: every open one, and those closed in the last hour.
    A breaker is decided by one process: a host may have one row per process. An
    open breaker whose probe was due more than a minute ago is marked stale (its
    process stopped asking that host); `jobledger prune` removes rows last changed
    before its cutoff."""
    with session.store() as store:
        stats = store.stats()
        # Breaker times are in the store's clock (the server's, on PostgreSQL).
        now = store.now()
        rows = [row for row in store.breakers() if row.shown(now)]
    if as_json:
        data = output.plain(stats)
        assert isinstance(data, dict)
        data["breakers"] = [_breaker_json(row, now) for row in rows]
        output.print_json(data)
        return
    _print_stats(stats)
    if rows:
        _print_breakers(rows, now)


def _breaker_json(row: BreakerRow, now: float) -> dict[str, object]:
    out = output.plain(row)
    assert isinstance(out, dict)
    out["stale"] = row.stale(now)
    return out


def _print_breakers(rows: list[BreakerRow], now: float) -> None:
    con = output.console()
    con.print(
        f"circuit breakers (each process's own; closed ones for "
        f"{output.duration(BREAKER_RECENT_SECONDS)}):"
    )
    out = output.table("host", "worker", "state", "failures", "when", "last error")
    for row in rows:
        out.add_row(
            row.host,
            row.worker,
            "open (stale)" if row.stale(now) else str(row.state),
            str(row.failures),
            _breaker_when(row, now),
            output.clip(row.last_error),
        )
    con.print(out)


def _breaker_when(row: BreakerRow, now: float) -> str:
    if row.state is BreakerMove.CLOSED:
        return f"closed {output.duration(max(now - row.changed_at, 0.0))} ago"
    assert row.until is not None
    if row.until > now:
        return f"probe in {output.duration(row.until - now)}"
    late = output.duration(now - row.until)
    if row.stale(now):
        return f"probe was due {late} ago; its process stopped asking"
    return f"probe due {late} ago"


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
