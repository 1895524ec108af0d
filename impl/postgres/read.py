"""Read-only queries of a PostgreSQL ledger: jobs, leases, effects, history, stats.

Each runs inside one read-only snapshot transaction opened by the store, so a report
that takes several statements (``stats``) is still consistent with itself.
"""

from __future__ import annotations

from psycopg.rows import DictRow

from impl.postgres import queries as q
from impl.postgres import rollup
from impl.postgres.database import Tx
from impl.postgres.registry import stored
from impl.postgres.rows import effect_info, history_event, job_info, lease_row, missing_job
from model.breaker import BreakerMove, BreakerRow
from model.record import EffectInfo, HistoryEvent, JobInfo, LeaseRow, Stats


def job_row(tx: Tx, job_id: str, *, lock: bool = False) -> DictRow:
    """Return the job's row (locked for update if ``lock``), or raise ``UnknownJob``."""
    query = q.JOB_FOR_UPDATE if lock else q.JOB
    row = tx.one(query, {"job_id": job_id}) if isinstance(job_id, str) else None
    if row is None:
        raise tx.drive(missing_job(job_id))
    return row


def jobs(
    tx: Tx, *, state: str | None, kind: str | None, limit: int | None, newest_first: bool
) -> list[JobInfo]:
    """Return jobs in planned order (or newest first), filtered."""
    query = q.JOBS_NEWEST if newest_first else q.JOBS
    rows = tx.all(query, {"state": state, "kind": kind, "limit": limit})
    return [job_info(r, tx.now) for r in rows]


def leases(tx: Tx) -> list[LeaseRow]:
    """Return the leases that are set, soonest expiry first."""
    return [lease_row(r, tx.now) for r in tx.all(q.LEASES)]


def effects(tx: Tx, job_id: str) -> list[EffectInfo]:
    """Return the job's effects in the order they were first started."""
    job_row(tx, job_id)
    return [effect_info(r) for r in tx.all(q.EFFECTS, {"job_id": job_id})]


def history(tx: Tx, job_id: str) -> list[HistoryEvent]:
    """Return the job's history, oldest first."""
    job_row(tx, job_id)
    return [history_event(r) for r in tx.all(q.HISTORY, {"job_id": job_id})]


def stats(tx: Tx) -> Stats:
    """Return counts by kind and state, leases, in-doubt effects, failures and lag."""
    flows = stored(tx)
    by_state = {f.name: dict.fromkeys(f.states, 0) for f in flows}
    counted, oldest = rollup.counts(tx, flows)
    for kind, states in counted.items():
        by_state.setdefault(kind, {}).update(states)
    summary = tx.one(q.SUMMARY, {"now": tx.now})
    assert summary is not None
    return Stats(
        by_state=by_state,
        leases_live=summary["leases_live"],
        leases_expired=summary["leases_expired"],
        in_doubt=summary["in_doubt"],
        failed=sum(by_state[f.name][f.failed] for f in flows),
        oldest_eligible_age=None if oldest is None else tx.now - oldest,
    )


def due_in(tx: Tx, kinds: list[str] | None) -> float | None:
    """Seconds until the first unfinished job of ``kinds`` (None: any) is eligible:
    <= 0 when one is now, None when none is unfinished."""
    query = q.NEXT_DUE if kinds is None else q.NEXT_DUE_OF_KINDS
    row = tx.one(query, {"kinds": kinds})
    assert row is not None
    due = row["due_in"]
    return None if due is None else float(due)


def breakers(tx: Tx) -> list[BreakerRow]:
    """Every recorded breaker row, by host then worker."""
    return [
        BreakerRow(
            host=r["host"],
            worker=r["worker"],
            state=BreakerMove(r["state"]),
            failures=int(r["failures"]),
            last_error=r["last_error"],
            opened_at=r["opened_at"],
            until=r["until_at"],
            changed_at=float(r["changed_at"]),
            opens=int(r["opens"]),
        )
        for r in tx.all(q.BREAKERS)
    ]
