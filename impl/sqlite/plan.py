"""Planning jobs on SQLite: ``plan`` and ``plan_many`` in one transaction.

Items are validated and checked against the stored jobs (and the items before them) in
order, inside the write transaction, so the first bad item decides the error exactly as
in the model and a failing batch plans nothing. New rows and their PLANNED history
entries are written with ``executemany``; identity and payload JSON is encoded once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping

import attrs

from impl.sqlite import queries as q
from impl.sqlite.catalog import Catalog
from impl.sqlite.connection import translated, write
from impl.sqlite.row import history_params, text_of
from model.clock import Clock
from model.config import Config
from model.errors import IdempotencyConflict, InvalidInput, InvalidPayload
from model.key import Scalar, check_scalars, job_key
from model.record import Event, Plan
from model.validate import check_int, check_seconds, encode_payload

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


@attrs.frozen
class _NewJob:
    job_id: str
    identity: str
    payload: str
    priority: int
    max_attempts: int
    run_at: float | None


def plan_items(
    conn: sqlite3.Connection,
    clock: Clock,
    config: Config,
    catalog: Catalog,
    *,
    op: str,
    kind: str,
    items: list[Mapping[str, Scalar] | Plan],
) -> list[str]:
    """Plan ``items`` of ``kind`` in one transaction named ``op``; return ids in order.

    Raises:
        UnknownWorkflow, InvalidIdentity, InvalidPayload, InvalidInput,
        IdempotencyConflict: for the first item in order that has a problem; then
        nothing is planned.
    """
    with translated(op):
        catalog.get(conn, kind)
    with write(conn, op, clock) as now:
        workflow = catalog.get(conn, kind)
        # Items are checked in order, each against the stored jobs and the items
        # before it, so the first bad item decides the error, as in the model.
        batch: dict[str, str] = {}
        fresh: list[_NewJob] = []
        ids: list[str] = []
        for item in items:
            new = _prepare(config, kind, item)
            ids.append(new.job_id)
            stored = batch.get(new.job_id)
            if stored is None:
                found = conn.execute(q.SELECT_PAYLOAD, (new.job_id,)).fetchone()
                stored = None if found is None else str(found[0])
            if stored is not None and stored != new.payload:
                raise IdempotencyConflict(
                    f"{op} of a {kind!r} job with identity {new.identity}: job "
                    f"{new.job_id} is already planned with payload {stored}, not "
                    f"{new.payload}; a job's payload is fixed at planning: plan a "
                    "different identity, or keep the payload"
                )
            if stored is None:
                fresh.append(new)
            batch[new.job_id] = new.payload
        conn.executemany(
            q.INSERT_JOB,
            [
                (
                    p.job_id,
                    kind,
                    p.identity,
                    p.payload,
                    workflow.initial,
                    p.max_attempts,
                    p.priority,
                    now if p.run_at is None else p.run_at,
                    now,
                    now,
                )
                for p in fresh
            ],
        )
        conn.executemany(
            q.INSERT_HISTORY,
            [history_params(p.job_id, now, Event.PLANNED, 0, worker=None) for p in fresh],
        )
    return ids


def _prepare(config: Config, kind: str, item: Mapping[str, Scalar] | Plan) -> _NewJob:
    plan = item if isinstance(item, Plan) else Plan(item)
    job_id = job_key(kind, plan.identity)
    try:
        payload = encode_payload(plan.payload)
    except RecursionError:
        raise InvalidPayload(
            f"payload of the {kind!r} job {job_id} is nested too deeply to encode as JSON"
        ) from None
    priority = _int64(check_int(plan.priority, name="priority"), "priority")
    attempts = plan.max_attempts
    if attempts is not None:
        _int64(check_int(attempts, name="max_attempts", minimum=1), "max_attempts")
    run_at = None if plan.run_at is None else check_seconds(plan.run_at, name="run_at")
    return _NewJob(
        job_id=job_id,
        identity=text_of(check_scalars(plan.identity, what="identity")),
        payload=payload,
        priority=priority,
        max_attempts=attempts if attempts is not None else config.max_attempts,
        run_at=run_at,
    )


def _int64(value: int, name: str) -> int:
    # SQLite integers are 64-bit; a larger Python int would fail in the driver.
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidInput(
            f"{name} must fit in a signed 64-bit integer ({INT64_MIN} to {INT64_MAX}), got {value}"
        )
    return value
