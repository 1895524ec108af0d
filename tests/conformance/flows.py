"""Workflows and small helpers shared by the conformance tests.

Only public API is used here: the helpers read a store through ``job``, ``effects`` and
``history``, so a snapshot compares what any caller could observe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from model import (
    EffectInfo,
    HistoryEvent,
    JobInfo,
    Lease,
    ManualClock,
    Store,
    Workflow,
)

LINEAR = Workflow(
    name="linear",
    states=["NEW", "A", "B", "DONE"],
    transitions=[("NEW", "A"), ("A", "B"), ("B", "DONE")],
    initial="NEW",
    terminal=["DONE"],
)
"""NEW -> A -> B -> DONE, plus FAILED."""

BRANCH = Workflow(
    name="branch",
    states=["NEW", "MID", "LEFT", "RIGHT", "SKIPPED"],
    transitions={"NEW": ["MID", "SKIPPED"], "MID": ["LEFT", "RIGHT"]},
    initial="NEW",
    terminal=["LEFT", "RIGHT", "SKIPPED"],
)
"""NEW -> MID -> LEFT | RIGHT, NEW -> SKIPPED, plus FAILED."""

StoreFactory = Callable[..., Store]
"""The ``store_factory`` fixture: opens (another handle on) the store under test."""

TTL = 30.0
"""The contract's default lease TTL, which every store opened without a config uses."""


def setup(store: Store, *workflows: Workflow) -> Store:
    """Register ``workflows`` (LINEAR by default) and return the store."""
    for wf in workflows or (LINEAR,):
        store.register(wf)
    return store


def plan_and_lease(
    store: Store,
    identity: Mapping[str, str | int | bool | None] | None = None,
    *,
    kind: str = "linear",
    worker: str = "w1",
    **plan_options: object,
) -> Lease:
    """Plan one job and lease it; fail the test if another job is handed out."""
    job_id = store.plan(kind, identity if identity is not None else {"n": 1}, **plan_options)  # type: ignore[arg-type]
    lease = store.lease_next(worker)
    assert lease is not None
    assert lease.job_id == job_id
    return lease


Snapshot = tuple[JobInfo, list[EffectInfo], list[HistoryEvent]]


def snapshot(store: Store, job_id: str) -> Snapshot:
    """Everything a caller can observe about one job."""
    return store.job(job_id), store.effects(job_id), store.history(job_id)


def events(store: Store, job_id: str) -> list[str]:
    """The job's history as event names, oldest first."""
    return [str(e.event) for e in store.history(job_id)]


def expire(clock: ManualClock, lease: Lease) -> None:
    """Move the clock exactly to the lease's expiry: from now on it is dead."""
    assert lease.expires_at >= clock()
    clock.now = lease.expires_at
