"""Claiming on SQLite: how ``lease_next`` finds and grants the next eligible job.

The candidate is the first eligible job in lease_next's order, found by walking the
partial index ``jobs_active`` (see ``queries.SELECT_CANDIDATE``). The usual claim is one
statement (``queries.CLAIM_FIRST``) that grants it when it is unleased and has attempts
left. Otherwise the general path decides: an expired lease on the candidate is ended
(and recorded), an exhausted candidate enters its failed state and the walk goes on.
Both paths start from the same candidate, so the fast one is purely an optimisation;
neither slows down with the number of finished jobs.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import attrs
from attrs import field, frozen

from impl.sqlite import maintenance
from impl.sqlite import queries as q
from impl.sqlite.catalog import Catalog
from impl.sqlite.connection import (
    LedgerConnection,
    NothingToWaitFor,
    Tx,
    float_text,
    worker_text,
)
from impl.sqlite.row import identity_of, job_row, json_of, text_of
from model.clock import Clock
from model.record import Event, Lease
from model.validate import exhausted_message

_LEASED = Event.LEASED.value
_EXPIRED = Event.EXPIRED.value


@frozen
class KindFilter:
    """The kinds a claim considers: its two statements and the parameters they filter on."""

    claim: str
    candidate: str
    params: Mapping[str, str] = field(factory=dict)


EVERY_KIND = KindFilter(q.CLAIM_FIRST, q.SELECT_CANDIDATE)
"""No filter: every kind."""


@functools.lru_cache(maxsize=256)
def kind_filter(kinds: tuple[str, ...]) -> KindFilter:
    """The filter for ``kinds`` (computed once per list: a worker asks for the same one on
    every claim)."""
    if len(kinds) == 1:
        return KindFilter(q.CLAIM_FIRST_OF_KIND, q.SELECT_CANDIDATE_OF_KIND, {"kind": kinds[0]})
    return KindFilter(
        q.CLAIM_FIRST_OF_KINDS, q.SELECT_CANDIDATE_OF_KINDS, {"kinds": text_of(list(kinds))}
    )


def lease_next(
    conn: LedgerConnection,
    clock: Clock,
    catalog: Catalog,
    *,
    worker: str,
    span: float,
    kinds: KindFilter,
) -> Lease | None:
    """Lease the first eligible job of ``kinds`` to ``worker`` for ``span`` seconds, or
    return None.

    While another process holds the write lock, this asks between two tries whether any
    job of ``kinds`` is eligible at all, and returns None at once if none is (a read sees
    a committed state, so that answer was true during the call): a worker polling an
    empty queue does not queue up for the lock.
    """

    def none_eligible() -> bool:
        return _candidate(conn, kinds, float(clock())) is None

    try:
        with Tx(conn, "lease_next", clock, pointless=none_eligible) as tx:
            now = tx.now
            params: dict[str, object] = {
                "worker": worker,
                "expires_at": now + span,
                "now": now,
                "at": float_text(now),
                "worker_text": worker_text(worker),
                **kinds.params,
            }
            granted = conn.execute(kinds.claim, params).fetchone()
            if granted is None:
                return _lease_next_slowly(tx, catalog, worker, now + span, kinds)
            job_id, kind, identity, payload, state, token, attempts, length = granted
            # The grant wrote its LEASED entry itself.
            tx.note(job_id, _LEASED, token, worker)
            tx.spill_if_long(job_id, length)
    except NothingToWaitFor:
        return None
    return Lease(
        job_id=job_id,
        kind=kind,
        token=token,
        worker=worker,
        expires_at=now + span,
        attempt=attempts,
        state=state,
        identity=identity_of(identity),
        payload=json_of(payload),
    )


def _lease_next_slowly(
    tx: Tx, catalog: Catalog, worker: str, expires_at: float, kinds: KindFilter
) -> Lease | None:
    """The general claim: an expired lease may come first, exhausted jobs fail."""
    conn, now = tx.conn, tx.now
    while True:
        found = _candidate(conn, kinds, now)
        if found is None:
            return None
        row = job_row(found)
        if row.lease_worker is not None:
            tx.history(row.job_id, _EXPIRED, row.token, row.lease_worker)
        if row.attempts >= row.max_attempts:
            maintenance.enter_failed(
                tx,
                catalog.get(conn, row.kind),
                row.job_id,
                row.token,
                exhausted_message(row.attempts, row.max_attempts),
            )
            continue
        granted = conn.execute(
            q.GRANT_LEASE,
            {
                "worker": worker,
                "expires_at": expires_at,
                "now": now,
                "job_id": row.job_id,
                "token": row.token,
            },
        ).fetchone()
        token, attempts = int(granted[0]), int(granted[1])
        tx.history(row.job_id, _LEASED, token, worker)
        return attrs.evolve(
            row,
            token=token,
            attempts=attempts,
            lease_worker=worker,
            lease_expires_at=expires_at,
        ).lease()


def _candidate(conn: LedgerConnection, kinds: KindFilter, now: float) -> tuple[object, ...] | None:
    """The row of the eligible job of ``kinds`` that comes first at ``now``, or None."""
    found: tuple[object, ...] | None = conn.execute(
        kinds.candidate, {"now": now, **kinds.params}
    ).fetchone()
    return found
