"""Workflows: declared monotonic state machines, and the built-in download workflow.

A workflow is a directed acyclic graph of progress states. Jobs move only along declared
edges and never backwards; the failed state is entered only through ``fail`` or ``cancel``
and left only through the operator's ``retry``. The checks here are pure graph checks,
shared by every backend, and so is :func:`edge_to`, the one rule of ``advance`` (which
move a job in a state may make), so that every backend decides and words it alike.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

from attrs import field, frozen

from model.errors import IllegalTransition, InvalidWorkflow

FAILED_DEFAULT = "FAILED"

THEN = "run_effect(then=...)"
"""How :func:`edge_to`'s messages name the move of ``run_effect``'s ``then``."""


def _states(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _terminal(value: Iterable[str]) -> frozenset[str]:
    return frozenset(value)


def _edges(
    value: Iterable[tuple[str, str]] | Mapping[str, Iterable[str]],
) -> frozenset[tuple[str, str]]:
    if isinstance(value, Mapping):
        return frozenset((src, dst) for src, dsts in value.items() for dst in dsts)
    out: set[tuple[str, str]] = set()
    for edge in value:
        if not isinstance(edge, tuple | list) or len(edge) != 2:
            raise InvalidWorkflow(f"transition {edge!r} is not a (from_state, to_state) pair")
        out.add((edge[0], edge[1]))
    return frozenset(out)


@frozen(eq=False)
class Workflow:
    """A declared monotonic state machine.

    Args:
        name: the workflow's name, used as the job's ``kind``.
        states: every progress state (the failed state is added if missing).
        transitions: the edges, as ``(from, to)`` pairs or a mapping ``from -> [to, ...]``.
        initial: the state a planned job starts in; not terminal.
        terminal: the states that end a job (the failed state is always one).
        failed: the state ``fail`` and ``cancel`` move a job into.

    Raises:
        InvalidWorkflow: naming the offending state or edge when the graph has an unknown
            state, a cycle, an edge out of a terminal state, or a terminal initial state.
    """

    name: str
    states: tuple[str, ...] = field(converter=_states)
    transitions: frozenset[tuple[str, str]] = field(converter=_edges)
    initial: str
    terminal: frozenset[str] = field(converter=_terminal)
    failed: str = FAILED_DEFAULT

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidWorkflow(f"workflow name must be a non-empty str, got {self.name!r}")
        for state in self.states:
            if not isinstance(state, str) or not state:
                raise InvalidWorkflow(
                    f"workflow {self.name!r}: state {state!r} is not a non-empty str"
                )
        if len(set(self.states)) != len(self.states):
            dupes = sorted({s for s in self.states if self.states.count(s) > 1})
            raise InvalidWorkflow(f"workflow {self.name!r}: states listed twice: {dupes}")
        # The failed state is part of every workflow and always terminal; adding it here
        # lets a user declare only the progress states.
        if self.failed not in self.states:
            object.__setattr__(self, "states", (*self.states, self.failed))
        object.__setattr__(self, "terminal", self.terminal | {self.failed})
        known = set(self.states)
        for state in sorted(self.terminal):
            if state not in known:
                raise InvalidWorkflow(
                    f"workflow {self.name!r}: terminal state {state!r} is not among the "
                    f"states {list(self.states)}"
                )
        if self.initial not in known:
            raise InvalidWorkflow(
                f"workflow {self.name!r}: initial state {self.initial!r} is not among the "
                f"states {list(self.states)}"
            )
        if self.initial in self.terminal:
            raise InvalidWorkflow(
                f"workflow {self.name!r}: initial state {self.initial!r} is terminal; a job "
                "would end the moment it is planned"
            )
        for src, dst in sorted(self.transitions):
            for end in (src, dst):
                if end not in known:
                    raise InvalidWorkflow(
                        f"workflow {self.name!r}: edge {src}->{dst} names unknown state "
                        f"{end!r}; declare it in states"
                    )
            if src == dst:
                raise InvalidWorkflow(
                    f"workflow {self.name!r}: edge {src}->{dst} is a self-loop; states never repeat"
                )
            if src in self.terminal:
                raise InvalidWorkflow(
                    f"workflow {self.name!r}: edge {src}->{dst} leaves terminal state "
                    f"{src!r}; terminal states have no outgoing edges"
                )
        cycle = self._find_cycle()
        if cycle:
            raise InvalidWorkflow(
                f"workflow {self.name!r}: edges form a cycle {'->'.join(cycle)}; states "
                "only move forward"
            )

    def _find_cycle(self) -> list[str]:
        succ = self.successors()
        color: dict[str, int] = {}
        stack: list[str] = []

        def visit(node: str) -> list[str]:
            color[node] = 1
            stack.append(node)
            for nxt in sorted(succ.get(node, ())):
                if color.get(nxt) == 1:
                    return [*stack[stack.index(nxt) :], nxt]
                if nxt not in color:
                    found = visit(nxt)
                    if found:
                        return found
            stack.pop()
            color[node] = 2
            return []

        for state in self.states:
            if state not in color:
                found = visit(state)
                if found:
                    return found
        return []

    def successors(self) -> dict[str, frozenset[str]]:
        """Return each state's declared next states."""
        out: dict[str, set[str]] = {s: set() for s in self.states}
        for src, dst in self.transitions:
            out[src].add(dst)
        return {s: frozenset(d) for s, d in out.items()}

    def ancestors(self) -> dict[str, frozenset[str]]:
        """Return, for each state, the states from which it can be reached.

        A job in state ``s`` has moved past every state in ``ancestors()[s]``: advancing
        to one of them is a replay, not a move backwards.
        """
        preds: dict[str, set[str]] = {s: set() for s in self.states}
        for src, dst in self.transitions:
            preds[dst].add(src)
        out: dict[str, frozenset[str]] = {}
        for state in self.states:
            seen: set[str] = set()
            todo = list(preds[state])
            while todo:
                node = todo.pop()
                if node not in seen:
                    seen.add(node)
                    todo.extend(preds[node])
            out[state] = frozenset(seen)
        return out

    def is_terminal(self, state: str) -> bool:
        """Return True if ``state`` ends a job."""
        return state in self.terminal

    def definition(self) -> dict[str, object]:
        """Return the order-free canonical form used to compare and store definitions."""
        return {
            "name": self.name,
            "states": sorted(self.states),
            "transitions": sorted([src, dst] for src, dst in self.transitions),
            "initial": self.initial,
            "terminal": sorted(self.terminal),
            "failed": self.failed,
            "order": list(self.states),
        }

    def _identity(self) -> tuple[object, ...]:
        return (
            self.name,
            tuple(sorted(self.states)),
            tuple(sorted(self.transitions)),
            self.initial,
            tuple(sorted(self.terminal)),
            self.failed,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Workflow):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    @classmethod
    def from_definition(cls, data: Mapping[str, object]) -> Workflow:
        """Rebuild a workflow from :meth:`definition` output (as stored by a backend)."""
        order = data.get("order") or data["states"]
        transitions = data["transitions"]
        terminal = data["terminal"]
        assert isinstance(order, list)
        assert isinstance(transitions, list)
        assert isinstance(terminal, list)
        return cls(
            name=str(data["name"]),
            states=[str(s) for s in order],
            transitions=[(str(a), str(b)) for a, b in transitions],
            initial=str(data["initial"]),
            terminal=[str(s) for s in terminal],
            failed=str(data["failed"]),
        )


DOWNLOAD = Workflow(
    name="download",
    states=[
        "PLANNED",
        "HEAD_DONE",
        "RESUME_OK",
        "STREAMING",
        "FINALIZED",
        "INDEXED",
        "DEDUPED",
        "SKIPPED_DUPLICATE",
        "FAILED",
    ],
    transitions=[
        ("PLANNED", "HEAD_DONE"),
        ("HEAD_DONE", "RESUME_OK"),
        ("HEAD_DONE", "STREAMING"),
        ("RESUME_OK", "STREAMING"),
        ("STREAMING", "FINALIZED"),
        ("FINALIZED", "INDEXED"),
        ("FINALIZED", "DEDUPED"),
        ("PLANNED", "SKIPPED_DUPLICATE"),
        ("HEAD_DONE", "SKIPPED_DUPLICATE"),
    ],
    initial="PLANNED",
    terminal=["INDEXED", "DEDUPED", "SKIPPED_DUPLICATE", "FAILED"],
    failed="FAILED",
)
"""The built-in download workflow (CONTRACT section 5); always registered."""


def edge_to(
    flow: Workflow,
    job_id: str,
    state: str,
    to_state: str,
    *,
    passed: frozenset[str] | None = None,
    asked: str = "advance",
) -> bool:
    """``advance``'s rule: may a job in ``state`` move to ``to_state``?

    Args:
        passed: ``flow.ancestors()[state]``, for a caller that keeps it cached.
        asked: the call, for the message ("advance", or "run_effect(then=...)").

    Returns:
        True when ``to_state`` is one declared edge away (the move to make); False when the
        job is in ``to_state`` or has passed it (a replay: nothing to do).

    Raises:
        IllegalTransition: ``to_state`` is not a state of ``flow``, is its failed state, or
            is neither reached nor one declared edge away.
    """
    if to_state not in flow.states:
        raise IllegalTransition(
            f"{asked} of job {job_id} to {to_state!r}: not a state of workflow "
            f"{flow.name!r} (states: {list(flow.states)}); use a declared state"
        )
    if to_state == flow.failed:
        raise IllegalTransition(
            f"{asked} of job {job_id} to the failed state {to_state!r}: it is entered only "
            "through store.fail(lease, error) or the operator's store.cancel(job_id, reason)"
        )
    if passed is None:
        passed = flow.ancestors()[state]
    if to_state == state or to_state in passed:
        return False
    if (state, to_state) not in flow.transitions:
        raise IllegalTransition(
            f"{asked} of job {job_id} from {state!r} to {to_state!r}: no such edge in "
            f"workflow {flow.name!r}; from {state!r} it can go to "
            f"{sorted(flow.successors()[state])}"
        )
    return True


@functools.lru_cache(maxsize=64)
def passed_states(flow: Workflow) -> Mapping[str, frozenset[str]]:
    """``flow.ancestors()``, computed once per workflow (hot paths ask it per call)."""
    return flow.ancestors()


def reached(flow: Workflow, state: str, to_state: str) -> bool:
    """True when a job in ``state`` is in ``to_state`` or has passed it."""
    return to_state == state or to_state in passed_states(flow)[state]
