"""Entry points of the worker processes the PostgreSQL tests spawn.

They live in an importable module because ``multiprocessing`` with the ``spawn`` start
method imports the target in a fresh interpreter; each child opens its own store (a pool
is never carried across processes).
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

import attrs

from impl import failpoint
from impl.postgres.store import PostgresStore
from model import Config, ManualClock
from tests.agreement.scenario import CONFIG, START, operation_of, operations, setup

Report = tuple[str, object]


def claim_all(url: str, schema: str, name: str, start: Barrier, out: Queue[Report]) -> None:
    """Lease jobs until none is left, finishing each one; report (job_id, token) pairs."""
    try:
        with PostgresStore(url, config=Config(postgres_schema=schema)) as store:
            # Every child has its pool open before any claims, so the claims overlap.
            start.wait(30)
            claimed: list[tuple[str, int]] = []
            while (lease := store.lease_next(name, ttl=60)) is not None:
                claimed.append((lease.job_id, lease.token))
                store.advance(lease, "SKIPPED_DUPLICATE")
            out.put((name, claimed))
    except BaseException:
        out.put((name, traceback.format_exc()))


def open_and_register(url: str, schema: str, name: str, start: Barrier, out: Queue[Report]) -> None:
    """Open a store on a schema that may not exist yet, at the same time as others."""
    try:
        start.wait(30)
        with PostgresStore(url, config=Config(postgres_schema=schema)) as store:
            out.put((name, [w.name for w in store.workflows()]))
    except BaseException:
        out.put((name, traceback.format_exc()))


def run_scenario_until_killed(url: str, schema: str, point: str, then: str | None) -> None:
    """Set up the failpoint sweep's scenario (tests.agreement.scenario), arm ``point`` to
    SIGKILL this process, and make the operation that reaches it (its ``run_effect``
    given ``then``); the store knows the workflow first, so every transaction takes its
    one-statement path. Exits 3 if the failpoint never fired."""
    clock = ManualClock(START)
    store = PostgresStore(url, clock=clock, config=attrs.evolve(CONFIG, postgres_schema=schema))
    world = setup(store, clock)
    store.workflow("flow")
    failpoint.arm(point, "kill")
    with contextlib.suppress(RuntimeError):
        operations(then)[operation_of(point)](store, world)
    sys.exit(3)
