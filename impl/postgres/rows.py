"""Turning PostgreSQL rows into the model's records, and the lease check on a job row.

The rows come from the column lists in ``queries`` (``JOB_COLUMNS``, ``EFFECT_COLUMNS``)
as dictionaries; JSON columns are stored as canonical text and decoded here.
"""

from __future__ import annotations

import json
from typing import Any

from psycopg.rows import DictRow

from impl.postgres import queries as q
from impl.postgres import steps
from impl.postgres.steps import Steps
from model.errors import InvalidInput, JobPruned, LeaseLost, UnknownJob
from model.record import (
    EffectInfo,
    EffectStatus,
    Event,
    HistoryEvent,
    JobInfo,
    Lease,
    LeaseRow,
)
from model.retention import PRUNED_REASON


def is_live(row: DictRow, now: float) -> bool:
    """Return True while the row's lease is set and ``now`` is before its expiry."""
    return row["lease_worker"] is not None and now < row["lease_expires_at"]


def check_lease(lease: object, row: DictRow, now: float, op: str) -> Lease:
    """Return ``lease`` if it is the job's live lease, else raise ``LeaseLost``.

    Only the lease's job id and token count: the expiry is the stored one, so a renew by
    another holder of the same token extends it for everyone.
    """
    if not isinstance(lease, Lease):
        raise InvalidInput(f"{op} needs a Lease from lease_next, got {type(lease).__name__}")
    if lease.token != row["token"]:
        raise LeaseLost(row["job_id"], lease.token, row["token"], "the token is stale", op)
    if not is_live(row, now):
        raise LeaseLost(row["job_id"], lease.token, row["token"], "the lease expired", op)
    return lease


def plain(lease: object) -> bool:
    """Whether ``lease`` is a Lease whose job id, token and worker have their exact types.

    Only such a lease takes a one-statement hot path: the SQL compares these values as
    the server's types, which agree with Python's comparisons only for str and int (not
    bool); any other lease takes the general code, which decides exactly as before.
    """
    return (
        isinstance(lease, Lease)
        and type(lease.job_id) is str
        and type(lease.token) is int
        and type(lease.worker) is str
    )


def lease_of(row: DictRow) -> Lease:
    """Return the live lease stored on a job row."""
    return Lease(
        job_id=row["job_id"],
        kind=row["kind"],
        token=row["token"],
        worker=row["lease_worker"],
        expires_at=row["lease_expires_at"],
        attempt=row["attempts"],
        state=row["state"],
        identity=json.loads(row["identity"]),
        payload=json.loads(row["payload"]),
    )


def job_info(row: DictRow, now: float) -> JobInfo:
    """Return the snapshot of a job row as ``store.job`` shows it."""
    return JobInfo(
        job_id=row["job_id"],
        kind=row["kind"],
        identity=json.loads(row["identity"]),
        payload=json.loads(row["payload"]),
        state=row["state"],
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        priority=row["priority"],
        run_at=row["run_at"],
        token=row["token"],
        lease=lease_of(row) if is_live(row, now) else None,
        last_error=row["last_error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        failed_from=row["failed_from"],
        lease_worker=row["lease_worker"],
        lease_expires_at=row["lease_expires_at"],
    )


def lease_row(row: DictRow, now: float) -> LeaseRow:
    """Return a lease as the operator sees it."""
    return LeaseRow(
        job_id=row["job_id"],
        kind=row["kind"],
        state=row["state"],
        worker=row["lease_worker"],
        token=row["token"],
        expires_at=row["lease_expires_at"],
        live=now < row["lease_expires_at"],
    )


def effect_info(row: DictRow) -> EffectInfo:
    """Return one effect row."""
    result: Any = None if row["result"] is None else json.loads(row["result"])
    return EffectInfo(
        job_id=row["job_id"],
        op=row["op"],
        op_key=row["op_key"],
        status=EffectStatus(row["status"]),
        result=result,
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        token=row["token"],
        started_by=row["started_by"],
        extras=json.loads(row["extras"]),
    )


def history_event(row: DictRow) -> HistoryEvent:
    """Return one history row."""
    return HistoryEvent(
        job_id=row["job_id"],
        at=row["at"],
        event=Event(row["event"]),
        token=row["token"],
        worker=row["worker"],
        detail=json.loads(row["detail"]),
    )


def locked_job(lease: object, op: str) -> Steps[tuple[Lease, DictRow]]:
    """Lock the job ``lease`` names and return both after the lease check.

    Raises:
        InvalidInput: ``lease`` is not a Lease.
        UnknownJob: no such job.
        LeaseLost: the token is stale or the lease expired.
    """
    if not isinstance(lease, Lease):
        raise InvalidInput(f"{op} needs a Lease from lease_next, got {type(lease).__name__}")
    row = yield from steps.one(q.JOB_FOR_UPDATE, {"job_id": lease.job_id})
    if row is None:
        missing = yield from missing_job(lease.job_id)
        if isinstance(missing, JobPruned):
            raise LeaseLost(lease.job_id, lease.token, None, PRUNED_REASON, op)
        raise missing
    return check_lease(lease, row, (yield from steps.now()), op), row


def missing_job(job_id: object) -> Steps[UnknownJob]:
    """The error for a job id with no row: :class:`JobPruned` when a tombstone says it
    was pruned, else :class:`UnknownJob`."""
    stone = (
        (yield from steps.one(q.TOMBSTONE, {"job_id": job_id})) if isinstance(job_id, str) else None
    )
    if stone is None:
        return UnknownJob(job_id)  # type: ignore[arg-type]
    return JobPruned(
        str(job_id),
        kind=stone["kind"],
        state=stone["state"],
        finished_at=float(stone["finished_at"]),
        pruned_at=float(stone["pruned_at"]),
    )
