"""PostgreSQL: reconcile marking a dead start in doubt while a claim of the same job
commits. The claim is held open by hand, so the race is certain: reconcile's statement
waits for the job's row lock, and the claim commits a new token while it waits. The
in-doubt entry must carry the token the job has when reconcile writes it (the history's
tokens never go back), not the one of reconcile's older snapshot.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from psycopg import sql

from impl import failpoint
from model import ManualClock, ReconcileReport, Workflow
from tests.pg import PG_URL
from tests.postgres.conftest import OpenStore

pytestmark = pytest.mark.postgres

FLOW = Workflow(name="f", states=["A", "B"], transitions=[("A", "B")], initial="A", terminal=["B"])


def test_a_start_marked_in_doubt_while_a_claim_commits_gets_the_new_token(
    open_pg: OpenStore, pg_schema: str
) -> None:
    clock = ManualClock()
    store = open_pg(clock=clock)
    store.register(FLOW)
    job_id = store.plan("f", {"n": 1})
    lease = store.lease_next("w1")
    assert lease is not None
    assert lease.token == 1
    # The effect's result is lost between its durable start and its record (the fuzz
    # cut the session there), and the worker gives the job back: no lease, a start.
    failpoint.arm("effect.after_start")
    try:
        with pytest.raises(failpoint.Crash):
            store.run_effect(lease, "op", lambda _e: {"never": True})
    finally:
        failpoint.disarm_all()
    store.fail(lease, "StorageError: the connection was lost")
    reconciler = open_pg(clock=clock)
    with psycopg.connect(PG_URL) as claim:
        claim.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(pg_schema)))
        # What a claim of the job does to its row, left uncommitted: a new token.
        claim.execute(
            "UPDATE jobs SET token = token + 1, lease_worker = 'w2', "
            "lease_expires_at = %s WHERE job_id = %s",
            (clock() + 30.0, job_id),
        )
        got: list[ReconcileReport] = []
        thread = threading.Thread(target=lambda: got.append(reconciler.reconcile()))
        thread.start()
        time.sleep(0.5)  # reconcile's statement now waits on the job's row lock
        assert thread.is_alive()
        claim.commit()
    thread.join(10)
    assert got == [ReconcileReport(leases_expired=0, effects_in_doubt=1, jobs_failed=0)]
    doubts = [h for h in store.history(job_id) if h.event == "effect_in_doubt"]
    assert [h.token for h in doubts] == [2]
    assert store.job(job_id).token == 2
