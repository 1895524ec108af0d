"""Fixtures for the fuzz tests: a clean, real history built in-process for the checker."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import attrs
import pytest

from impl.fuzz import workload
from impl.fuzz.checker import Evidence
from impl.fuzz.evidence import collect_evidence
from impl.fuzz.history import HistoryWriter
from impl.fuzz.sink import FencedSink
from impl.fuzz.workload import KIND, WORKFLOW, Tools, make_handler
from impl.sqlite.store import SqliteStore
from impl.worker import JobContext, Worker
from model import Config, ManualClock, Plan

TTL = 10.0
ROOT = Path(__file__).resolve().parents[2]


def child_env() -> dict[str, str]:
    """The environment for a test's subprocess: this checkout first on the import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@attrs.define
class CleanRun:
    """A small real run: two workers in one process, one lease stolen mid-job."""

    evidence: Evidence
    folder: Path


def build_clean_run(folder: Path) -> CleanRun:
    """Run four jobs to the end with two workers, one of them losing a lease on the way.

    Worker ``a`` leases the first job, runs its first effect, then the clock jumps past
    the TTL; worker ``b`` takes the job over (a new token) and finishes everything, and
    ``a``'s next move fails with ``LeaseLost``. The history is therefore clean but not
    trivial: two grants for one job, an effect replayed under the newer token.
    """
    clock = ManualClock()
    db = folder / "ledger.sqlite"
    logs = folder / "histories"
    logs.mkdir()
    store = SqliteStore(db, clock=clock, config=Config(lease_ttl=TTL, backoff_base=0.0))
    sink = FencedSink(folder / "sink.sqlite")
    try:
        store.register(WORKFLOW)
        planned = store.plan_many(KIND, [Plan({"n": i}, payload={}) for i in range(4)])
        writers = {n: HistoryWriter(logs / f"{n}.jsonl", n, clock) for n in ("a", "b")}
        tools = {
            n: Tools(worker=n, sink=sink, log=w, rng=random.Random(1), pause=0.0, yield_rate=0.0)
            for n, w in writers.items()
        }
        lease = store.lease_next("a", ttl=TTL)
        assert lease is not None
        ctx = JobContext(store, lease, lost=threading.Event(), stopping=threading.Event())
        writers["a"].write("lease", job=lease.job_id, token=lease.token, attempt=1, state="NEW")
        workload.run_step_effect(ctx, tools["a"], "fetch", None)
        clock.advance(TTL + 1)
        worker = Worker(store, {KIND: make_handler(tools["b"])}, name="b", ttl=TTL, renew_every=5.0)
        worker.run(until_idle=True)
        for w in writers.values():
            w.close()
        evidence, _torn = collect_evidence(store, planned=planned, logs=logs, sink=sink.path, db=db)
        return CleanRun(evidence, folder)
    finally:
        sink.close()
        store.close()


@pytest.fixture
def clean_run(tmp_path: Path) -> CleanRun:
    """A real, clean history (see :func:`build_clean_run`)."""
    return build_clean_run(tmp_path)
