"""The claim by kinds (every ``Worker`` claims by its handlers' kinds) walks the ready
index, whatever plan PostgreSQL settles on: it must not read every job of the kind."""

from __future__ import annotations

import json

import psycopg
import pytest
from psycopg import sql

from impl.postgres import queries as q
from model import Workflow
from tests.postgres.conftest import OpenStore

pytestmark = pytest.mark.postgres

FLOW = Workflow(
    name="w",
    states=["NEW", "DONE"],
    transitions=[("NEW", "DONE")],
    initial="NEW",
    terminal=["DONE"],
)


def _reads(plan: object) -> list[str]:
    """How a JSON plan reads ``jobs``: each index it scans, or "Seq Scan"."""
    found: list[str] = []
    if isinstance(plan, dict):
        if "Index Name" in plan:
            found.append(str(plan["Index Name"]))
        elif plan.get("Node Type") == "Seq Scan" and plan.get("Relation Name") == "jobs":
            found.append("Seq Scan")
        for value in plan.values():
            found += _reads(value)
    elif isinstance(plan, list):
        for value in plan:
            found += _reads(value)
    return found


@pytest.mark.parametrize("mode", ["force_generic_plan", "force_custom_plan"])
def test_a_claim_by_kinds_walks_the_ready_index_in_any_plan(
    open_pg: OpenStore,
    pg_admin: psycopg.Connection[tuple[object, ...]],
    pg_schema: str,
    mode: str,
) -> None:
    """Most jobs of the kind finished, a few left: the claim's plan, generic (what a
    prepared statement settles on) or custom, reads ``jobs_ready`` (active jobs, in
    claim order). Comparing the bare ``kind`` column let the generic plan read the kind's every
    job through ``jobs_kind_state`` and sort them (1 ms per claim at 2,000 jobs)."""
    store = open_pg()
    store.register(FLOW)
    store.plan_many("w", [{"n": n} for n in range(3000)])
    pg_admin.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(pg_schema)))
    # The ledger of a worker that has run a while: most of the kind's jobs are finished
    # (set directly: the trigger still checks the edge and keeps `active`).
    pg_admin.execute("UPDATE jobs SET state = 'DONE' WHERE seq <= (SELECT max(seq) - 10 FROM jobs)")
    assert pg_admin.execute("SELECT count(*) FROM jobs WHERE active").fetchone() == (10,)
    pg_admin.execute(sql.SQL("SET plan_cache_mode = {}").format(sql.SQL(mode)))
    params = {"kinds": ["w"], "worker": "w", "ttl": 30.0, "clock": None}
    cursor = psycopg.ClientCursor(pg_admin)
    cursor.execute("EXPLAIN (FORMAT JSON) " + q.CLAIM_OF_KINDS, params)
    (row,) = cursor.fetchall()
    plan = row[0] if not isinstance(row[0], str) else json.loads(row[0])
    # The candidate comes from the ready index (active jobs only); the update that
    # follows finds its row by the primary key.
    assert sorted(_reads(plan)) == ["jobs_pkey", "jobs_ready"], plan
