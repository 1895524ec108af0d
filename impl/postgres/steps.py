"""Transaction bodies as statement steps, run by a sync or an async driver.

A body that must run both on the sync store (``psycopg.Connection`` from a pool, in a
thread) and natively on an event loop (``psycopg.AsyncConnection`` from an
``AsyncConnectionPool``, :mod:`impl.postgres.asyncdb`) is written once, as a generator:
it *yields* each thing it asks of its transaction (an :class:`Op`: run a statement, the
transaction's ``now``, a history entry a statement appended, a wake-up to announce) and
gets the answer sent back. :meth:`impl.postgres.database.Tx.drive` answers them with
blocking calls, :meth:`impl.postgres.asyncdb.AsyncTx.drive` with awaited ones. The SQL
stays in :mod:`impl.postgres.queries` and every decision in the one generator, so the two
faces cannot disagree (the pattern of :mod:`model.effectstep`, one level down).

Write ``row = yield from one(q.X, params)``; an error of a statement is thrown into the
generator at that point, as a call would raise it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Mapping
from typing import Generic, TypeVar, cast

from attrs import frozen
from psycopg.rows import DictRow

from impl.postgres import queries as q
from model.record import Detail, Event, HistoryEvent

T = TypeVar("T")

Params = Mapping[str, object] | None


@frozen
class One:
    """Run ``query``; answer its first row or None.

    ``alone``: the statement may be committed on its own, in the same round trip as its
    ``BEGIN`` and ``COMMIT`` (:meth:`impl.postgres.database.Database.transact`), because
    it is complete by itself: after its answer the body either returns (noting
    :class:`Logged` entries only) or asks for more only when the statement wrote
    nothing. Only the first step of a body can be run so; any other driver runs it as a
    plain statement.
    """

    query: str
    params: Params = None
    alone: bool = False


@frozen
class All:
    """Run ``query``; answer every row."""

    query: str
    params: Params = None


@frozen
class Run:
    """Run ``query``; answer how many rows it touched."""

    query: str
    params: Params = None


@frozen
class Now:
    """Answer the transaction's ``now`` (the one clock rule, impl.postgres.database)."""


@frozen
class Logged:
    """A statement appended this history entry by itself (for telemetry after commit)."""

    event: HistoryEvent


@frozen
class Announce:
    """Wake idle workers once this transaction commits (``Tx.announce``)."""

    kind: str
    later: bool = False


Op = One | All | Run | Now | Logged | Announce

Steps = Generator[Op, object, T]
"""A transaction body in steps: yields :data:`Op`, returns the body's result."""


@frozen
class Transaction(Generic[T]):
    """A named writing transaction: ``op`` names its failpoints, ``body`` makes a fresh
    generator for each try (a transaction the server asks to re-run starts over)."""

    op: str
    body: Callable[[], Steps[T]]


def one(query: str, params: Params = None) -> Steps[DictRow | None]:
    """``tx.one``: the first row of ``query``, or None."""
    return cast("DictRow | None", (yield One(query, params)))


def alone(query: str, params: Params = None) -> Steps[DictRow | None]:
    """``tx.one`` of a statement that is complete by itself (see :class:`One`)."""
    return cast("DictRow | None", (yield One(query, params, alone=True)))


def all_rows(query: str, params: Params = None) -> Steps[list[DictRow]]:
    """``tx.all``: every row of ``query``."""
    return cast("list[DictRow]", (yield All(query, params)))


def run(query: str, params: Params = None) -> Steps[int]:
    """``tx.run``: how many rows ``query`` touched."""
    return cast(int, (yield Run(query, params)))


def now() -> Steps[float]:
    """``tx.now``: the transaction's one ``now``."""
    return cast(float, (yield Now()))


def logged(event: HistoryEvent) -> Steps[None]:
    """``tx.logged``: note a history entry a statement appended."""
    yield Logged(event)


def announce(kind: str, *, later: bool = False) -> Steps[None]:
    """``tx.announce``: wake waiters for ``kind`` once the transaction commits."""
    yield Announce(kind, later)


def log(
    job_id: str,
    event: Event,
    *,
    token: int,
    worker: str | None,
    detail: Mapping[str, Detail] | None = None,
) -> Steps[None]:
    """``tx.log``: append ``event`` to the job's history at the transaction's ``now``."""
    facts = dict(detail or {})
    row = yield from one(
        q.LOG,
        {
            "job_id": job_id,
            "event": event.value,
            "token": token,
            "worker": worker,
            "detail": json.dumps(facts, sort_keys=True),
        },
    )
    assert row is not None
    yield Logged(HistoryEvent(job_id, row["at"], event, token, worker, facts))
