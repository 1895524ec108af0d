"""The workflow catalog: workflow definitions persisted in the database.

A definition is stored as the canonical JSON of ``Workflow.definition()``, and its states
and edges are also spread into ``workflow_states`` and ``workflow_edges`` so that the
state-machine trigger can check every state change in SQL. Definitions never change once
registered (a different one raises :class:`WorkflowConflict`), so each handle may cache
them; a name it does not know yet is looked up again, since another process may have
registered it since.
"""

from __future__ import annotations

import json
import sqlite3
import threading

from impl.sqlite import queries as q
from impl.sqlite.connection import LedgerConnection, Tx
from impl.sqlite.row import text_of
from model.errors import InvalidInput, UnknownWorkflow, WorkflowConflict
from model.workflow import Workflow


class Catalog:
    """One store handle's view of the registered workflows."""

    def __init__(self) -> None:
        self._cache: dict[str, Workflow] = {}
        self._ancestors: dict[str, dict[str, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def get(self, conn: sqlite3.Connection, name: str) -> Workflow:
        """Return the workflow ``name``, reading the database if it is not cached.

        Raises:
            UnknownWorkflow: if no workflow of that name is registered.
        """
        found = self._cache.get(name) if isinstance(name, str) else None
        if found is not None:
            return found
        row = conn.execute(q.SELECT_WORKFLOW, (name,)).fetchone() if isinstance(name, str) else None
        if row is None:
            known = ", ".join(sorted(w.name for w in self.all(conn))) or "none"
            raise UnknownWorkflow(
                f"no workflow named {name!r} is registered (registered: {known}); call "
                "store.register(workflow) before planning jobs of that kind"
            )
        return self._remember(_decode(str(row[0])))

    def cached(self, name: object) -> Workflow | None:
        """Return the workflow ``name`` if this handle has read it already, else None."""
        return self._cache.get(name) if isinstance(name, str) else None

    def all(self, conn: sqlite3.Connection) -> list[Workflow]:
        """Return every registered workflow, sorted by name."""
        out = []
        for name, definition in conn.execute(q.SELECT_WORKFLOWS).fetchall():
            cached = self._cache.get(str(name))
            out.append(cached if cached is not None else self._remember(_decode(definition)))
        return out

    def ancestors(self, workflow: Workflow) -> dict[str, frozenset[str]]:
        """Return ``workflow.ancestors()``, computed once per handle."""
        found = self._ancestors.get(workflow.name)
        if found is None:
            found = workflow.ancestors()
            with self._lock:
                self._ancestors[workflow.name] = found
        return found

    def register(self, conn: LedgerConnection, workflow: Workflow) -> None:
        """Store ``workflow`` unless the identical definition is stored already.

        Raises:
            InvalidInput: if ``workflow`` is not a :class:`Workflow`.
            WorkflowConflict: if the name is stored with a different definition.
        """
        if not isinstance(workflow, Workflow):
            raise InvalidInput(
                f"register expects a Workflow, got {type(workflow).__name__}; build one "
                "with Workflow(name, states, transitions, initial, terminal)"
            )
        # Most calls re-register a known definition (every open registers DOWNLOAD): a
        # plain read settles them without taking the write lock.
        if self._settled(conn, workflow):
            return
        with Tx(conn, "register"):
            if self._settled(conn, workflow):
                return
            name = workflow.name
            conn.execute(
                q.INSERT_WORKFLOW,
                (name, text_of(workflow.definition()), workflow.initial, workflow.failed),
            )
            conn.executemany(
                q.INSERT_WORKFLOW_STATE,
                [(name, s, int(workflow.is_terminal(s))) for s in workflow.states],
            )
            conn.executemany(
                q.INSERT_WORKFLOW_EDGE,
                [(name, src, dst) for src, dst in sorted(workflow.transitions)],
            )
        self._remember(workflow)

    def _settled(self, conn: sqlite3.Connection, workflow: Workflow) -> bool:
        row = conn.execute(q.SELECT_WORKFLOW, (workflow.name,)).fetchone()
        if row is None:
            return False
        stored = self._remember(_decode(str(row[0])))
        if stored != workflow:
            raise WorkflowConflict(
                f"workflow {workflow.name!r} is already registered with a different "
                f"definition (stored: {stored.definition()}, asked: "
                f"{workflow.definition()}); register it under a new name, since jobs "
                "planned under the stored definition depend on it"
            )
        return True

    def _remember(self, workflow: Workflow) -> Workflow:
        with self._lock:
            return self._cache.setdefault(workflow.name, workflow)


def _decode(definition: str) -> Workflow:
    data = json.loads(definition)
    assert isinstance(data, dict)
    return Workflow.from_definition(data)
