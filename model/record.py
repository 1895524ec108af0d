"""The records every backend returns: leases, jobs, effects, history, reports.

All are frozen attrs classes so a caller can keep them, compare them and print them
without fearing that a later call changes them underneath.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from attrs import field, frozen

from model.key import Scalar

JSON = None | bool | int | float | str | list["JSON"] | dict[str, "JSON"]
"""A JSON value as Python represents it."""

Detail = str | int | float | bool | None
"""A value in a history event's ``detail``."""


@frozen
class Lease:
    """A worker's time-limited, exclusive right to act on one job.

    ``token`` is the fencing token: it grows with every grant (and every operator cancel
    or retry), so a call carrying an older token changes nothing. ``expires_at`` is in
    the store's clock seconds; ``state`` is the job's state when the lease was granted or
    last renewed.
    """

    job_id: str
    kind: str
    token: int
    worker: str
    expires_at: float
    attempt: int
    state: str
    identity: Mapping[str, Scalar]
    payload: JSON = None


@frozen
class JobInfo:
    """A snapshot of one job. ``lease`` is set only while a lease is live."""

    job_id: str
    kind: str
    identity: Mapping[str, Scalar]
    payload: JSON
    state: str
    attempts: int
    max_attempts: int
    priority: int
    run_at: float
    token: int
    lease: Lease | None
    last_error: str | None
    created_at: float
    updated_at: float
    failed_from: str | None = None
    lease_worker: str | None = None
    lease_expires_at: float | None = None


@frozen
class Plan:
    """One item for ``plan_many``: an identity with the options ``plan`` takes."""

    identity: Mapping[str, Scalar]
    payload: JSON = field(default=None, kw_only=True)
    priority: int = field(default=0, kw_only=True)
    max_attempts: int | None = field(default=None, kw_only=True)
    run_at: float | None = field(default=None, kw_only=True)


@frozen
class EffectContext:
    """What an effect's ``fn`` receives.

    Pass ``op_key`` downstream as an idempotency key and ``token`` as a fencing token
    wherever the target system accepts one.
    """

    job_id: str
    op: str
    op_key: str
    token: int
    attempt: int


@frozen
class DoubtInfo:
    """What an ``on_doubt`` probe receives about an effect left in doubt."""

    job_id: str
    op: str
    op_key: str
    started_at: float
    started_token: int
    started_by: str


class EffectStatus(enum.StrEnum):
    """Where an effect stands: started (result not yet recorded), in doubt, or done."""

    STARTED = "started"
    IN_DOUBT = "in_doubt"
    DONE = "done"


@frozen
class EffectInfo:
    """One effect of a job, as ``show`` prints it."""

    job_id: str
    op: str
    op_key: str
    status: EffectStatus
    result: JSON
    started_at: float
    finished_at: float | None
    token: int
    started_by: str
    extras: Mapping[str, Scalar] = field(factory=dict)


class Event(enum.StrEnum):
    """The kinds of entries in a job's history."""

    PLANNED = "planned"
    LEASED = "leased"
    RENEWED = "renewed"
    RELEASED = "released"
    EXPIRED = "expired"
    ADVANCED = "advanced"
    EFFECT_STARTED = "effect_started"
    EFFECT_RECORDED = "effect_recorded"
    EFFECT_IN_DOUBT = "effect_in_doubt"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETRIED = "retried"


@frozen
class HistoryEvent:
    """One entry of a job's append-only history.

    ``detail`` holds event-specific facts: ``from``/``to`` for moves, ``op`` for effects,
    ``error`` and ``retry_at`` for failures.
    """

    job_id: str
    at: float
    event: Event
    token: int
    worker: str | None
    detail: Mapping[str, Detail] = field(factory=dict)


@frozen
class LeaseRow:
    """A lease as the operator sees it: live or expired but not yet reconciled."""

    job_id: str
    kind: str
    state: str
    worker: str
    token: int
    expires_at: float
    live: bool


@frozen
class ReconcileReport:
    """What one reconcile pass did. Two idle passes compare equal (all zeros)."""

    leases_expired: int = 0
    effects_in_doubt: int = 0
    jobs_failed: int = 0


@frozen
class Stats:
    """Counts for operators and dashboards.

    ``by_state`` maps each registered kind to every declared state's count, zeros
    included. ``in_doubt`` counts effects whose start belongs to a dead lease and whose
    result was never recorded. ``oldest_eligible_age`` is the queue lag in seconds.
    """

    by_state: Mapping[str, Mapping[str, int]]
    leases_live: int
    leases_expired: int
    in_doubt: int
    failed: int
    oldest_eligible_age: float | None
