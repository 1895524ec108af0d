"""Planning jobs on PostgreSQL: idempotent inserts keyed by the job key.

A batch is one transaction, and every item is validated and inserted in turn, so the
first bad item (or conflicting payload, also against an earlier item of the same batch)
raises before commit and nothing of the batch is kept. ``INSERT ... ON CONFLICT DO
NOTHING`` makes concurrent planners of one key agree on one row.
"""

from __future__ import annotations

from impl.postgres import queries as q
from impl.postgres.database import Tx
from model.errors import IdempotencyConflict
from model.key import canon, check_scalars, job_key
from model.record import Event, Plan
from model.validate import check_int, check_seconds, encode_payload
from model.workflow import Workflow


def plan_items(tx: Tx, flow: Workflow, items: list[Plan], *, max_attempts: int) -> list[str]:
    """Plan ``items`` of workflow ``flow``; return their ids in item order.

    Args:
        max_attempts: the default for items that give none.

    Raises:
        InvalidIdentity, InvalidPayload, InvalidInput: for the first bad item.
        IdempotencyConflict: a job key exists with a different payload.
    """
    kind = flow.name
    ids = []
    for item in items:
        jid = job_key(kind, item.identity)
        text = encode_payload(item.payload)
        check_int(item.priority, name="priority")
        if item.max_attempts is not None:
            check_int(item.max_attempts, name="max_attempts", minimum=1)
        if item.run_at is not None:
            check_seconds(item.run_at, name="run_at")
        ident = check_scalars(item.identity, what="identity")
        params = {
            "job_id": jid,
            "kind": kind,
            "identity": canon(ident).decode("utf-8"),
            "payload": text,
            "state": flow.initial,
            "max_attempts": item.max_attempts if item.max_attempts is not None else max_attempts,
            "priority": item.priority,
            # None: the statement uses the transaction's now (the one clock rule).
            "run_at": float(item.run_at) if item.run_at is not None else None,
        }
        if tx.one(q.INSERT_JOB, params) is not None:
            tx.log(jid, Event.PLANNED, token=0, worker=None)
            # A given run_at may lie ahead: waiters read when it is due.
            tx.announce(kind, later=item.run_at is not None)
        else:
            row = tx.one(q.JOB_PAYLOAD, {"job_id": jid})
            assert row is not None, "a conflicting insert means the row exists"
            if row["payload"] != text:
                raise IdempotencyConflict(
                    f"job {jid} ({kind} {dict(item.identity)}) is already planned with "
                    f"payload {row['payload']}, not {text}; a job's payload is fixed at "
                    "planning: plan a different identity, or keep the payload"
                )
        ids.append(jid)
    return ids
