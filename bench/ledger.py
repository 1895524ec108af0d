"""The subject side of the benchmarks: jobledger driven through its public API.

One tiny workflow (``PLANNED -> DONE``) and the loop every lifecycle benchmark runs:
``lease_next``, one no-op ``run_effect``, ``advance`` to the terminal state.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import impl
from impl import Config, JobledgerError, Store
from impl.sqlite.store import SqliteStore

__all__ = [
    "KIND",
    "WORKFLOW",
    "SqliteStore",
    "Store",
    "handler",
    "identities",
    "lifecycle",
    "noop",
    "open_sqlite",
]

KIND = "bench"
WORKFLOW = impl.Workflow(KIND, ("PLANNED", "DONE"), (("PLANNED", "DONE"),), "PLANNED", ("DONE",))


def identities(n: int, *, offset: int = 0) -> list[dict[str, str | int]]:
    """``n`` distinct identities."""
    return [{"n": i, "batch": "bench"} for i in range(offset, offset + n)]


def open_sqlite(
    path: Path, synchronous: str = "NORMAL", *, group_window: float = 0.0
) -> SqliteStore:
    """Open a SQLite store on ``path`` with the bench workflow registered (its commits
    grouped when ``group_window`` > 0, see ``impl.sqlite.group``)."""
    config = Config(sqlite_synchronous=synchronous, sqlite_group_window=group_window)
    # Through the public entry point; the cast only tells mypy what a path opens (the
    # Store protocol does not declare the context-manager methods).
    store = cast(SqliteStore, impl.open_store(path, config=config))
    store.register(WORKFLOW)
    return store


def noop(_ctx: impl.EffectContext) -> None:
    """The effect every lifecycle runs: nothing, so only the ledger's cost is measured."""


def lifecycle(store: Store, worker: str = "bench") -> tuple[int, int, int]:
    """Lease, run one no-op effect and finish jobs until none is eligible.

    Returns ``(jobs done, busy errors, other errors)`` where an error is any
    :class:`JobledgerError` that reached this caller (the job is then left to expire).
    """
    done = busy = other = 0
    while True:
        try:
            lease = store.lease_next(worker)
            if lease is None:
                return done, busy, other
            store.run_effect(lease, "noop", noop)
            store.advance(lease, "DONE")
            done += 1
        except impl.DatabaseLocked:
            busy += 1
        except JobledgerError:
            other += 1


def handler(ctx: impl.JobContext) -> None:
    """The Worker-runtime equivalent of :func:`lifecycle`'s body."""
    ctx.effect("noop", noop)
    ctx.advance("DONE")
