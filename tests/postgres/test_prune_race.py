"""PostgreSQL: a plan that races a prune of the same key never brings the job back.

The plan's tombstone check reads its statement's snapshot; a prune that deletes the row
and writes the tombstone commits while the plan's insert waits on that row. The insert
then goes through, and only the plan's re-check in a fresh snapshot (``PRUNED_AMONG``)
undoes it. The prune's transaction is held open by hand here, so the race is certain.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from psycopg import sql

from model import JobPruned, ManualClock, Workflow
from tests.pg import PG_URL
from tests.postgres.conftest import OpenStore

pytestmark = pytest.mark.postgres

FLOW = Workflow(name="f", states=["A", "B"], transitions=[("A", "B")], initial="A", terminal=["B"])


def test_a_plan_waiting_on_a_pruned_row_does_not_plan_it_again(
    open_pg: OpenStore, pg_schema: str
) -> None:
    clock = ManualClock()
    store = open_pg(clock=clock)
    store.register(FLOW)
    job_id = store.plan("f", {"n": 1})
    lease = store.lease_next("w")
    assert lease is not None
    store.advance(lease, "B")
    clock.advance(1)
    planner = open_pg(clock=clock)
    with psycopg.connect(PG_URL) as prune:
        prune.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(pg_schema)))
        # What a prune batch does, left uncommitted: the row goes, the tombstone comes.
        prune.execute("DELETE FROM history WHERE job_id = %s", (job_id,))
        prune.execute(
            "INSERT INTO tombstones (job_id, kind, state, finished_at, pruned_at) "
            "SELECT job_id, kind, state, updated_at, 0 FROM jobs WHERE job_id = %s",
            (job_id,),
        )
        prune.execute("DELETE FROM jobs WHERE job_id = %s", (job_id,))
        got: list[object] = []
        thread = threading.Thread(target=lambda: got.append(planner.plan("f", {"n": 1})))
        thread.start()
        time.sleep(0.5)  # the plan's insert now waits on the deleted row's lock
        assert thread.is_alive()
        prune.commit()
    thread.join(10)
    assert got == [job_id]
    with pytest.raises(JobPruned):
        store.job(job_id)
    assert store.jobs() == []


def test_the_ledger_tables_vacuum_at_five_percent_dead_rows(
    open_pg: OpenStore, pg_schema: str
) -> None:
    """Prune deletes in batches; autovacuum starts on the ledger's tables at 5% dead rows
    (not PostgreSQL's 20%), so the space is reused while a big prune goes on."""
    open_pg()
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT c.relname, c.reloptions FROM pg_class c JOIN pg_namespace n"
            " ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind = 'r'"
            " AND c.relname IN ('jobs', 'effects', 'history')",
            (pg_schema,),
        ).fetchall()
    assert sorted(rows) == [
        (name, ["autovacuum_vacuum_scale_factor=0.05"]) for name in ("effects", "history", "jobs")
    ]
