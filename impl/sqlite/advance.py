"""Advancing a job on SQLite, inside a transaction its caller opened.

``advance`` opens its own transaction for it; ``run_effect(then=...)`` takes the same
move inside the transaction that records (or replays) the effect's result. Either way the
decision is :func:`model.workflow.edge_to`'s, and the write is one fenced update that
carries the job's ``advanced`` history entry.
"""

from __future__ import annotations

import sqlite3

from impl.sqlite import queries as q
from impl.sqlite.catalog import Catalog
from impl.sqlite.connection import Tx
from impl.sqlite.row import fence, fenceable, move_detail
from model.record import Event, Lease
from model.workflow import Workflow, edge_to

_ADVANCED = Event.ADVANCED.value


def advance_in(
    conn: sqlite3.Connection,
    tx: Tx,
    catalog: Catalog,
    lease: Lease,
    to_state: str,
    *,
    asked: str = "advance",
    from_state: object = None,
) -> bool:
    """``advance(lease, to_state)`` inside ``tx``: True if the job moved, False if it
    had reached ``to_state`` already.

    ``from_state`` is where the caller believes the job is (default ``lease.state``):
    the usual move from it is one statement, and anything else is decided on the row.

    Raises:
        LeaseLost: ``lease`` is not the job's live lease.
        IllegalTransition: ``edge_to`` refuses the move.
    """
    source = lease.state if from_state is None else from_state
    if _advance_as_believed(conn, tx, catalog, lease, to_state, source=source):
        return True
    token, holder, _, _, _, state, kind = fence(conn, lease, tx.now, asked)
    workflow = catalog.get(conn, kind)
    passed = catalog.ancestors(workflow)[state]
    if not edge_to(workflow, lease.job_id, state, to_state, passed=passed, asked=asked):
        return False
    if not advance_row(
        conn,
        tx,
        workflow,
        job_id=lease.job_id,
        token=token,
        worker=holder,
        from_state=state,
        to_state=to_state,
    ):  # pragma: no cover - fence has just read exactly this row
        raise AssertionError("a fenced advance along a declared edge updated nothing")
    return True


def _advance_as_believed(
    conn: sqlite3.Connection,
    tx: Tx,
    catalog: Catalog,
    lease: Lease,
    to_state: str,
    *,
    source: object,
) -> bool:
    """The usual advance in one statement: from ``source`` along a declared edge, under
    the live lease. False (nothing changed) leaves every other case, refusals included,
    to the general path."""
    if not fenceable(lease) or type(to_state) is not str or type(source) is not str:
        return False
    workflow = catalog.cached(lease.kind)
    if (
        workflow is None
        or (source, to_state) not in workflow.transitions
        or to_state == workflow.failed
    ):
        return False
    return advance_row(
        conn,
        tx,
        workflow,
        job_id=lease.job_id,
        token=lease.token,
        worker=lease.worker,
        from_state=source,
        to_state=to_state,
    )


def advance_row(
    conn: sqlite3.Connection,
    tx: Tx,
    workflow: Workflow,
    *,
    job_id: str,
    token: int,
    worker: str | None,
    from_state: str,
    to_state: str,
) -> bool:
    """Move the job from ``from_state`` to ``to_state`` (a declared edge) if it is still
    there under the live lease of ``token`` held by ``worker``; False if it is not."""
    detail = move_detail(from_state, to_state)
    params = {
        "state": to_state,
        "now": tx.now,
        "job_id": job_id,
        "token": token,
        "kind": workflow.name,
        "from_state": from_state,
        "worker": worker,
        "line": tx.line(_ADVANCED, token, worker, detail),
    }
    sql = q.ADVANCE_TO_TERMINAL if workflow.is_terminal(to_state) else q.ADVANCE_KEEP_LEASE
    if conn.execute(sql, params).rowcount == 0:
        return False
    tx.note(job_id, _ADVANCED, token, worker, detail)
    return True
