"""``advance``'s move on PostgreSQL: the one rule applied to a locked job row, and what
the one-statement paths may assume about a workflow's edges.

The rule is :func:`model.workflow.edge_to` (the model's, so every backend decides and
words it alike); :func:`move` applies it to a job row locked by the general code, for
``advance`` and for ``run_effect(then=...)``. :class:`Edges` caches, per workflow and
target state, what the single statements need (``ADVANCE_NOW``, the effect's
``*_THEN_NOW``): the one state a move to the target can leave, and the states from which
``then`` is legal at all. Registered workflows never change, so neither do these.
"""

from __future__ import annotations

from psycopg.rows import DictRow

from impl.postgres import queries as q
from impl.postgres import steps
from impl.postgres.steps import Steps
from model.errors import IllegalTransition, LeaseLost
from model.record import Event, Lease
from model.workflow import Workflow, edge_to


def flow_source(flow: Workflow, to_state: str) -> str | None:
    """Return the one state from which ``advance`` to ``to_state`` moves, if only one can.

    A state qualifies when it has a declared edge to ``to_state`` and the general rules
    would take it (``to_state`` is neither the state itself, nor one it has passed, nor
    the failed state). None when no state or several states qualify.
    """
    if to_state not in flow.states or to_state == flow.failed:
        return None
    ancestors = flow.ancestors()
    sources = [
        src
        for src, dst in flow.transitions
        if dst == to_state and src != to_state and to_state not in ancestors[src]
    ]
    return sources[0] if len(sources) == 1 else None


def legal_from(flow: Workflow, to_state: str) -> tuple[str, ...]:
    """Return the states in which ``advance`` to ``to_state`` is no error (a move or a
    replay), in the workflow's order: :func:`edge_to` asked of every state."""
    legal = []
    for state in flow.states:
        try:
            edge_to(flow, "", state, to_state)
        except IllegalTransition:
            continue
        legal.append(state)
    return tuple(legal)


class Edges:
    """One store's cache of :func:`flow_source` and :func:`legal_from`, by (kind, state)."""

    def __init__(self) -> None:
        self._sources: dict[tuple[str, str], str | None] = {}
        self._legal: dict[tuple[str, str], tuple[str, ...]] = {}

    def source(self, flow: Workflow, to_state: str) -> str | None:
        """:func:`flow_source`, computed once per edge and store."""
        edge = (flow.name, to_state)
        if edge not in self._sources:
            self._sources[edge] = flow_source(flow, to_state)
        return self._sources[edge]

    def legal(self, flow: Workflow, to_state: str) -> tuple[str, ...]:
        """:func:`legal_from`, computed once per target and store."""
        edge = (flow.name, to_state)
        if edge not in self._legal:
            self._legal[edge] = legal_from(flow, to_state)
        return self._legal[edge]


def move(lease: Lease, row: DictRow, flow: Workflow, to_state: str, *, asked: str) -> Steps[bool]:
    """Take ``advance``'s move of the job ``row`` (locked, ``lease`` checked on it).

    Returns:
        True when the job moved along the edge, False when it had reached ``to_state``
        already (nothing written).

    Raises:
        IllegalTransition: :func:`edge_to` refuses the move (``asked`` names the call),
            before anything is written.
    """
    if not edge_to(flow, row["job_id"], row["state"], to_state, asked=asked):
        return False
    yield from take(lease, row, flow, to_state, asked=asked)
    return True


def take(lease: Lease, row: DictRow, flow: Workflow, to_state: str, *, asked: str) -> Steps[None]:
    """Move the job ``row`` to ``to_state``, a move :func:`edge_to` has allowed."""
    job_id, state = row["job_id"], row["state"]
    now = yield from steps.now()
    moved = yield from steps.one(
        q.ADVANCE,
        {
            "job_id": lease.job_id,
            "token": lease.token,
            "now": now,
            "to_state": to_state,
            "from_state": state,
            "ends": flow.is_terminal(to_state),
        },
    )
    if moved is None:
        raise LeaseLost(lease.job_id, lease.token, row["token"], "the fence refused it", asked)
    yield from steps.log(
        job_id,
        Event.ADVANCED,
        token=row["token"],
        worker=row["lease_worker"],
        detail={"from": state, "to": to_state},
    )
