"""Job rows as the SQLite backend reads them, the fencing check, and history entries.

:class:`JobRow` is the typed image of one ``jobs`` row, for the reads and the slow
paths; the records callers receive (:class:`JobInfo`, :class:`Lease`,
:class:`EffectInfo`, :class:`HistoryEvent`) are built from rows here. :func:`fence` is
the one fencing decision every lease-taking call makes inside its write transaction
(or, where the update itself is fenced, the explanation of a refusal), on the few
columns it needs rather than the whole row.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from typing import cast

from attrs import frozen

from impl.sqlite import queries as q
from model.errors import InvalidInput, JobPruned, LeaseLost, UnknownJob
from model.key import Scalar, canon
from model.record import (
    JSON,
    EffectInfo,
    EffectStatus,
    Event,
    HistoryEvent,
    JobInfo,
    Lease,
    LeaseRow,
)
from model.retention import PRUNED_REASON
from model.validate import INT64_MAX, INT64_MIN


@frozen
class JobRow:
    """One ``jobs`` row, typed. ``identity`` and ``payload`` are still JSON text."""

    job_id: str
    kind: str
    identity: str
    payload: str
    state: str
    attempts: int
    max_attempts: int
    priority: int
    run_at: float
    token: int
    lease_worker: str | None
    lease_expires_at: float | None
    last_error: str | None
    failed_from: str | None
    created_at: float
    updated_at: float
    seq: int

    def live(self, now: float) -> bool:
        """Return True if a lease is set and ``now`` is before its expiry."""
        return (
            self.lease_worker is not None
            and self.lease_expires_at is not None
            and now < self.lease_expires_at
        )

    def lease(self) -> Lease:
        """Return the lease this row holds (the caller checked that one is set)."""
        assert self.lease_worker is not None
        assert self.lease_expires_at is not None
        return Lease(
            job_id=self.job_id,
            kind=self.kind,
            token=self.token,
            worker=self.lease_worker,
            expires_at=self.lease_expires_at,
            attempt=self.attempts,
            state=self.state,
            identity=identity_of(self.identity),
            payload=json_of(self.payload),
        )

    def info(self, now: float) -> JobInfo:
        """Return the caller-facing snapshot; ``lease`` only while live at ``now``."""
        return JobInfo(
            job_id=self.job_id,
            kind=self.kind,
            identity=identity_of(self.identity),
            payload=json_of(self.payload),
            state=self.state,
            attempts=self.attempts,
            max_attempts=self.max_attempts,
            priority=self.priority,
            run_at=self.run_at,
            token=self.token,
            lease=self.lease() if self.live(now) else None,
            last_error=self.last_error,
            created_at=self.created_at,
            updated_at=self.updated_at,
            failed_from=self.failed_from,
            lease_worker=self.lease_worker,
            lease_expires_at=self.lease_expires_at,
        )


def job_row(row: sqlite3.Row | tuple[object, ...]) -> JobRow:
    """Decode a row selected with ``queries.JOB_COLUMNS``."""
    return JobRow(
        job_id=str(row[0]),
        kind=str(row[1]),
        identity=str(row[2]),
        payload=str(row[3]),
        state=str(row[4]),
        attempts=_int(row[5]),
        max_attempts=_int(row[6]),
        priority=_int(row[7]),
        run_at=_float(row[8]),
        token=_int(row[9]),
        lease_worker=None if row[10] is None else str(row[10]),
        lease_expires_at=None if row[11] is None else _float(row[11]),
        last_error=None if row[12] is None else str(row[12]),
        failed_from=None if row[13] is None else str(row[13]),
        created_at=_float(row[14]),
        updated_at=_float(row[15]),
        seq=_int(row[16]),
    )


def _int(value: object) -> int:
    assert isinstance(value, int), f"expected an integer column, got {value!r}"
    return value


def _float(value: object) -> float:
    assert isinstance(value, int | float), f"expected a real column, got {value!r}"
    return float(value)


# Stored JSON texts are jobledger's own canonical encodings (no white space around them),
# so the decoder's scanner reads them directly, without json.loads' layers around it.
# (typeshed does not declare the attribute, which JSONDecoder.__init__ sets.)
_scan: Callable[[str, int], tuple[object, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def identity_of(text: str) -> dict[str, Scalar]:
    """Decode a stored identity."""
    value, _ = _scan(text, 0)
    assert isinstance(value, dict)
    return value


def json_of(text: str) -> JSON:
    """Decode stored JSON text (a payload, a result)."""
    if text == "null":  # most payloads and results: no decoder needed
        return None
    value, _ = _scan(text, 0)
    return cast(JSON, value)


def text_of(value: object) -> str:
    """Encode ``value`` canonically as text; raises TypeError/ValueError if not JSON."""
    return canon(value).decode("utf-8")


def fetch_job(conn: sqlite3.Connection, job_id: str) -> JobRow | None:
    """Return the job's row, or None if there is none."""
    row = conn.execute(q.SELECT_JOB, (job_id,)).fetchone()
    return None if row is None else job_row(row)


def require_job(conn: sqlite3.Connection, job_id: str) -> JobRow:
    """Return the job's row or raise :class:`UnknownJob` (:class:`JobPruned` if pruned)."""
    found = fetch_job(conn, job_id) if isinstance(job_id, str) else None
    if found is None:
        raise missing_job(conn, job_id)
    return found


def missing_job(conn: sqlite3.Connection, job_id: object) -> UnknownJob:
    """The error for a job id with no row: :class:`JobPruned` when a tombstone says it
    was pruned, else :class:`UnknownJob`."""
    stone = (
        conn.execute(q.SELECT_TOMBSTONE, (job_id,)).fetchone() if isinstance(job_id, str) else None
    )
    if stone is None:
        return UnknownJob(job_id)  # type: ignore[arg-type]
    kind, state, finished_at, pruned_at = stone
    return JobPruned(
        str(job_id),
        kind=str(kind),
        state=str(state),
        finished_at=float(finished_at),
        pruned_at=float(pruned_at),
    )


Fence = tuple[int, str | None, float | None, int, int, str, str]
"""A row of ``queries.SELECT_FENCE``: token, lease_worker, lease_expires_at, attempts,
max_attempts, state, kind."""


def fence(conn: sqlite3.Connection, lease: Lease, now: float, op: str) -> Fence:
    """Return the job's fencing columns if ``lease`` is its live lease at ``now``.

    Only ``lease.job_id`` and ``lease.token`` count: expiry is the stored one, so a
    renewal through any handle of the same token extends it for all.

    Raises:
        InvalidInput: ``lease`` is not a :class:`Lease`.
        UnknownJob: no job has the lease's id.
        LeaseLost: the token is stale, or the lease expired by the store's clock.
    """
    if not isinstance(lease, Lease):
        raise InvalidInput(f"{op} needs a Lease from lease_next, got {type(lease).__name__}")
    job_id = lease.job_id
    row: Fence | None = (
        conn.execute(q.SELECT_FENCE, (job_id,)).fetchone() if isinstance(job_id, str) else None
    )
    if row is None:
        missing = missing_job(conn, job_id)
        if isinstance(missing, JobPruned):
            raise LeaseLost(job_id, lease.token, None, PRUNED_REASON, op)
        raise missing
    if lease.token != row[0]:
        raise LeaseLost(job_id, lease.token, row[0], "the token is stale", op)
    expires_at = row[2]
    if row[1] is None or expires_at is None or not now < expires_at:
        raise LeaseLost(job_id, lease.token, row[0], "the lease expired", op)
    return row


def fenceable(lease: object) -> bool:
    """True if ``lease`` can be fenced inside an update (a Lease with a bindable id and
    token); anything else goes through :func:`fence` first, which explains the refusal."""
    return isinstance(lease, Lease) and isinstance(lease.job_id, str) and bindable(lease.token)


def bindable(value: object) -> bool:
    """True if ``value`` is an int SQLite can bind (a 64-bit signed integer)."""
    return type(value) is int and INT64_MIN <= value <= INT64_MAX


# History details are canonical JSON; the few distinct ones on hot paths are encoded once.
_DETAILS: dict[tuple[str, ...], str] = {}
_DETAILS_MAX = 4096


def op_detail(op: str) -> str:
    """Return the detail text ``{"op": op}`` of an effect's history entry."""
    found = _DETAILS.get(("op", op))
    if found is None:
        found = _remember_detail(("op", op), {"op": op})
    return found


def move_detail(src: str, dst: str) -> str:
    """Return the detail text ``{"from": src, "to": dst}`` of a state change."""
    found = _DETAILS.get(("move", src, dst))
    if found is None:
        found = _remember_detail(("move", src, dst), {"from": src, "to": dst})
    return found


def _remember_detail(key: tuple[str, ...], detail: dict[str, str]) -> str:
    text = text_of(detail)
    if len(_DETAILS) >= _DETAILS_MAX:
        _DETAILS.clear()  # op names are the caller's: keep the cache bounded
    _DETAILS[key] = text
    return text


def history_event(job_id: str, row: Sequence[object]) -> HistoryEvent:
    """Decode ``(at, event, token, worker, detail text)`` of one of ``job_id``'s entries."""
    detail = json.loads(str(row[4]))
    assert isinstance(detail, dict)
    return HistoryEvent(
        job_id=job_id,
        at=_float(row[0]),
        event=Event(str(row[1])),
        token=_int(row[2]),
        worker=None if row[3] is None else str(row[3]),
        detail=detail,
    )


Entry = tuple[int, HistoryEvent]
"""A history entry and its position (its place in the job's history)."""


def inline_entries(job_id: str, text: str, hist_n: int) -> list[Entry]:
    """Decode the entries kept inline in a job's row (``jobs.hist``, JSON lines).

    They are the job's last row entries, the last one the ``hist_n``-th, so their
    positions follow from their count (see ``queries.HISTORY_GAP``).
    """
    # Split at "\n" only: the JSON of a detail escapes "\n" but not the other breaks
    # str.splitlines knows (U+2028, U+0085, ...), which an error text may hold.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # each line ends with "\n"
    first = hist_n - len(lines) + 1
    out: list[Entry] = []
    for n, line in enumerate(lines, start=first):
        at, event, token, worker, detail = json.loads(line)
        out.append(
            (
                n * q.HISTORY_GAP,
                HistoryEvent(
                    job_id=job_id,
                    at=float(at),
                    event=Event(event),
                    token=int(token),
                    worker=worker,
                    detail=detail,
                ),
            )
        )
    return out


def planned_entry(job_id: str, created_at: float) -> HistoryEvent:
    """The PLANNED entry of a job planned from schema version 4 on, which is implied by
    its row (the first row entry, at its creation time) rather than stored."""
    return HistoryEvent(
        job_id=job_id, at=created_at, event=Event.PLANNED, token=0, worker=None, detail={}
    )


def effect_entries(job_id: str, row: Sequence[object]) -> list[Entry]:
    """Decode the entries an effect's row carries (``queries.SELECT_EFFECT_ENTRIES``)."""
    start_n, started_at, finish_n, finished_at, token, worker, op = row
    out: list[Entry] = []
    for n, at, event in (
        (start_n, started_at, Event.EFFECT_STARTED),
        (finish_n, finished_at, Event.EFFECT_RECORDED),
    ):
        if n is not None:
            out.append(
                (
                    _int(n),
                    HistoryEvent(
                        job_id=job_id,
                        at=_float(at),
                        event=event,
                        token=_int(token),
                        worker=str(worker),
                        detail={"op": str(op)},
                    ),
                )
            )
    return out


def effect_info(row: sqlite3.Row | tuple[object, ...]) -> EffectInfo:
    """Decode a row selected with ``queries.EFFECT_COLUMNS``."""
    return EffectInfo(
        job_id=str(row[1]),
        op=str(row[2]),
        op_key=str(row[0]),
        status=EffectStatus(str(row[4])),
        result=None if row[5] is None else json_of(str(row[5])),
        started_at=_float(row[6]),
        finished_at=None if row[7] is None else _float(row[7]),
        token=_int(row[8]),
        started_by=str(row[9]),
        extras=identity_of(str(row[3])),
    )


def lease_row(row: sqlite3.Row | tuple[object, ...], now: float) -> LeaseRow:
    """Decode a row selected by ``queries.SELECT_LEASES``."""
    expires_at = _float(row[5])
    return LeaseRow(
        job_id=str(row[0]),
        kind=str(row[1]),
        state=str(row[2]),
        worker=str(row[3]),
        token=_int(row[4]),
        expires_at=expires_at,
        live=now < expires_at,
    )
