"""Planning jobs on PostgreSQL: idempotent inserts keyed by the job key.

A batch is one transaction, and every item is validated and inserted in turn, so the
first bad item (or conflicting payload, also against an earlier item of the same batch)
raises before commit and nothing of the batch is kept. ``INSERT ... ON CONFLICT DO
NOTHING`` makes concurrent planners of one key agree on one row.
"""

from __future__ import annotations

from impl.postgres import queries as q
from impl.postgres import steps
from impl.postgres.steps import Steps
from model.errors import IdempotencyConflict
from model.key import canon, check_scalars, job_key
from model.record import Event, Plan
from model.validate import check_int, check_seconds, encode_payload
from model.workflow import Workflow


def plan_items(
    flow: Workflow, items: list[Plan], *, max_attempts: int, depth_limit: int
) -> Steps[list[str]]:
    """Plan ``items`` of workflow ``flow``; return their ids in item order.

    Args:
        max_attempts: the default for items that give none.
        depth_limit: the deepest nesting a payload may have (``json_depth_limit``).

    Raises:
        InvalidIdentity, InvalidPayload, InvalidInput: for the first bad item.
        IdempotencyConflict: a job key exists with a different payload.
    """
    kind = flow.name
    ids = []
    inserted: list[str] = []
    pruned: set[str] = set()
    for item in items:
        jid = job_key(kind, item.identity)
        text = encode_payload(item.payload, depth_limit=depth_limit)
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
        if jid in pruned:
            pass  # an earlier item of this batch found the key's tombstone
        elif (yield from steps.one(q.INSERT_JOB, params)) is not None:
            inserted.append(jid)
            # A given run_at may lie ahead: waiters read when it is due.
            yield from steps.announce(kind, later=item.run_at is not None)
        else:
            row = yield from steps.one(q.JOB_PAYLOAD, {"job_id": jid})
            if row is None:
                # No row, and the insert did nothing: the key has a tombstone (its job
                # was pruned), which keeps it planned and cannot conflict.
                pruned.add(jid)
            elif row["payload"] != text:
                raise IdempotencyConflict(
                    f"job {jid} ({kind} {dict(item.identity)}) is already planned with "
                    f"payload {row['payload']}, not {text}; a job's payload is fixed at "
                    "planning: plan a different identity, or keep the payload"
                )
        ids.append(jid)
    if inserted:
        # A prune that committed while an insert waited on the row it deleted: its
        # tombstone was not in the insert's snapshot, so look again in a fresh one.
        rows = yield from steps.all_rows(q.PRUNED_AMONG, {"ids": inserted})
        late = {r["job_id"] for r in rows}
        if late:
            yield from steps.run(q.UNPLAN, {"ids": sorted(late)})
        for jid in inserted:
            if jid not in late:
                yield from steps.log(jid, Event.PLANNED, token=0, worker=None)
    return ids
