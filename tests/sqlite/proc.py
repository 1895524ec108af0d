"""Worker processes for the multi-process tests (importable by a spawned child)."""

from __future__ import annotations

import time
import traceback
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

from attrs import frozen

from impl.sqlite.store import SqliteStore
from model import EffectContext

PROC_FLOW_NAME = "proc_flow"


@frozen
class WorkerReport:
    """What one worker process did: the (job id, token) pairs it was granted, or its error."""

    name: str
    grants: list[tuple[str, int]]
    error: str | None


def drain(path: str, name: str, start: Barrier, reports: Queue[WorkerReport]) -> None:
    """Open a store on ``path`` and work ``proc_flow`` jobs until none is eligible.

    Every worker opens its store, then waits at ``start`` so that they all contend for
    the same jobs from the first claim. The child never registers the workflow: it must
    learn it from the database. The report goes to ``reports``.
    """
    reports.put(_drain(path, name, start))


def _work(ctx: EffectContext) -> dict[str, int]:
    # A real effect takes a while outside any transaction. Without that, one process
    # can re-take the write lock right after each commit while the others sleep between
    # tries (waiting is not fair, see impl.sqlite.waiting), and drain every job alone.
    time.sleep(0.0005)
    return {"token": ctx.token}


def _drain(path: str, name: str, start: Barrier) -> WorkerReport:
    grants: list[tuple[str, int]] = []
    try:
        with SqliteStore(Path(path)) as store:
            flow = store.workflow(PROC_FLOW_NAME)
            start.wait(30)
            while True:
                lease = store.lease_next(name, ttl=60.0, kinds=[PROC_FLOW_NAME])
                if lease is None:
                    break
                grants.append((lease.job_id, lease.token))
                state = lease.state
                while not flow.is_terminal(state):
                    state = sorted(flow.successors()[state])[0]
                    store.run_effect(lease, f"to-{state}", _work)
                    assert store.advance(lease, state)
    except BaseException:
        return WorkerReport(name, grants, traceback.format_exc())
    return WorkerReport(name, grants, None)


def open_and_plan(path: str, start: Barrier, reports: Queue[str | None]) -> None:
    """Open a store on a fresh ``path`` at the same moment as others, and plan one job."""
    try:
        start.wait(30)
        with SqliteStore(Path(path)) as store:
            store.plan("download", {"url": "same"})
    except BaseException:
        reports.put(traceback.format_exc())
        return
    reports.put(None)
