"""The workflows stored in a PostgreSQL ledger, and each store's cache of them.

A definition is stored three ways in one transaction: its canonical JSON (to compare and
rebuild it), its states with their terminal flag, and its edges; the last two are what
the ``jobs_guard`` trigger reads to enforce the state machine inside the database.
Registered definitions never change (a different one is refused), so a store may cache
them for its whole life, even while other processes register more.
"""

from __future__ import annotations

import json

from impl.postgres import queries as q
from impl.postgres import steps
from impl.postgres.database import Tx
from impl.postgres.steps import Steps
from model.errors import UnknownWorkflow, WorkflowConflict
from model.key import canon
from model.workflow import Workflow


def stored(tx: Tx) -> list[Workflow]:
    """Return every workflow stored in the ledger, sorted by name."""
    return [Workflow.from_definition(json.loads(r["definition"])) for r in tx.all(q.WORKFLOWS)]


class Registry:
    """One store's view of the stored workflows, cached as they are looked up."""

    def __init__(self) -> None:
        self._known: dict[str, Workflow] = {}

    def get(self, tx: Tx, kind: str) -> Workflow:
        """Return the workflow named ``kind`` (in a plain transaction body)."""
        return tx.drive(self.lookup(kind))

    def lookup(self, kind: str) -> Steps[Workflow]:
        """Return the workflow named ``kind`` (in a body written as steps).

        Raises:
            UnknownWorkflow: naming the registered workflows.
        """
        flow = self._known.get(kind)
        if flow is not None:
            return flow
        row = (yield from steps.one(q.WORKFLOW, {"name": kind})) if isinstance(kind, str) else None
        if row is None:
            rows = yield from steps.all_rows(q.WORKFLOWS)
            names = [Workflow.from_definition(json.loads(r["definition"])).name for r in rows]
            raise UnknownWorkflow(
                f"no workflow named {kind!r} is registered; known: {names}; call "
                "store.register(Workflow(...)) first"
            )
        flow = Workflow.from_definition(json.loads(row["definition"]))
        self._known[kind] = flow
        return flow

    def cached(self, kind: object) -> Workflow | None:
        """Return the workflow ``kind`` if this store has looked it up before, else None."""
        return self._known.get(kind) if isinstance(kind, str) else None

    def register(self, tx: Tx, workflow: Workflow) -> None:
        """Store ``workflow`` unless the identical definition is there already.

        Raises:
            WorkflowConflict: the name is stored with a different definition.
        """
        params = {
            "name": workflow.name,
            "definition": canon(workflow.definition()).decode("utf-8"),
            "initial": workflow.initial,
            "failed": workflow.failed,
        }
        # ON CONFLICT DO NOTHING waits for a concurrent registration of the same name
        # to commit, so the comparison below always sees the winner's definition.
        if tx.one(q.INSERT_WORKFLOW, params) is not None:
            for state in workflow.states:
                terminal = workflow.is_terminal(state)
                tx.run(
                    q.INSERT_STATE, {"kind": workflow.name, "state": state, "terminal": terminal}
                )
            for src, dst in sorted(workflow.transitions):
                tx.run(q.INSERT_EDGE, {"kind": workflow.name, "src": src, "dst": dst})
            return
        known = self.get(tx, workflow.name)
        if known != workflow:
            raise WorkflowConflict(
                f"workflow {workflow.name!r} is already registered with a different "
                f"definition (stored: {known.definition()}, given: {workflow.definition()}); "
                "use a new name for a changed workflow"
            )
