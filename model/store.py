"""The ``Store`` protocol: the one interface every backend and the model implement.

The conformance suite, the specs and the stateful agreement tests are written against
this protocol, so any store that satisfies it can be checked the same way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Literal, Protocol, Self

from model.breaker import BreakerRow
from model.config import Config
from model.key import Scalar
from model.record import (
    JSON,
    DoubtInfo,
    EffectContext,
    EffectInfo,
    HistoryEvent,
    JobInfo,
    Lease,
    LeaseRow,
    Plan,
    ReconcileReport,
    Stats,
)
from model.retention import PRUNE_BATCH_DEFAULT, ArchiveFn, ProgressFn, PruneReport
from model.workflow import Workflow

OnDoubt = Literal["retry", "raise"] | Callable[[DoubtInfo], JSON]
"""What ``run_effect`` does with an effect left in doubt by a dead lease."""

EffectFn = Callable[[EffectContext], JSON]
"""An effect: called with its context, returns the JSON result to record."""


class Store(Protocol):
    """The job ledger's operations (CONTRACT section 2). A store is a context manager
    that closes itself on exit."""

    def __enter__(self) -> Self:
        """Return the store itself."""
        ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None:
        """Close the store."""
        ...

    def register(self, workflow: Workflow) -> None:
        """Store ``workflow``; idempotent; a different definition of the name raises."""
        ...

    def workflow(self, name: str) -> Workflow:
        """Return the registered workflow ``name`` or raise ``UnknownWorkflow``."""
        ...

    def workflows(self) -> list[Workflow]:
        """Return every registered workflow, by name."""
        ...

    def plan(
        self,
        kind: str,
        identity: Mapping[str, Scalar],
        *,
        payload: JSON = None,
        priority: int = 0,
        max_attempts: int | None = None,
        run_at: float | None = None,
    ) -> str:
        """Plan a job idempotently and return its id (the job key)."""
        ...

    def plan_many(self, kind: str, items: Iterable[Mapping[str, Scalar] | Plan]) -> list[str]:
        """Plan many jobs in one transaction; return their ids in item order."""
        ...

    def lease_next(
        self, worker: str, *, ttl: float | None = None, kinds: Sequence[str] | None = None
    ) -> Lease | None:
        """Lease the first eligible job, or return None when there is none."""
        ...

    def wait_for_work(
        self,
        timeout: float,
        *,
        kinds: Sequence[str] | None = None,
        stop: threading.Event | None = None,
    ) -> bool:
        """Block until a job of ``kinds`` is eligible, for at most ``timeout`` seconds.

        Returns True as soon as one is (at once if one is already), including when the
        earliest known ``run_at`` or lease expiry comes due without any write; False when
        the timeout passes first or ``stop`` is set. ``timeout`` is wall-clock seconds,
        however the store's clock runs. A backend may miss a sign of new work (a dropped
        listening connection): False is a hint, so callers still look now and then.
        """
        ...

    def renew(self, lease: Lease, *, ttl: float | None = None) -> Lease:
        """Extend a live lease to now + ttl."""
        ...

    def release(self, lease: Lease, *, delay: float = 0.0, reason: str | None = None) -> None:
        """Give the job back (and the attempt); eligible again after ``delay`` seconds.

        ``reason``, when given, is kept in the ``released`` history entry as
        ``detail["reason"]`` (why the job was handed back without spending an attempt).
        """
        ...

    def advance(self, lease: Lease, to_state: str) -> bool:
        """Follow one declared edge; False for a replay of a passed state."""
        ...

    def run_effect(
        self,
        lease: Lease,
        op: str,
        fn: EffectFn,
        *,
        extras: Mapping[str, Scalar] | None = None,
        on_doubt: OnDoubt = "retry",
        then: str | None = None,
    ) -> JSON:
        """Run ``fn`` once per op key and record its result; replay a recorded one.

        With ``then``, the job also advances to that state in the transaction that records
        (or replays) the result: one commit where ``run_effect`` and ``advance`` take two,
        and no crash between them. ``then`` is checked before ``fn`` runs.
        """
        ...

    def fail(
        self, lease: Lease, error: str, *, retryable: bool = True, delay: float | None = None
    ) -> None:
        """Record a failed attempt: retry after a backoff, or enter the failed state."""
        ...

    def cancel(self, job_id: str, reason: str) -> None:
        """Operator: move the job into the failed state, fencing out any holder."""
        ...

    def retry(self, job_id: str) -> None:
        """Operator: move a failed job back to the state it failed in, attempts reset."""
        ...

    def state(self, job_id: str) -> str:
        """Return the job's current state."""
        ...

    def job(self, job_id: str) -> JobInfo:
        """Return a snapshot of the job."""
        ...

    def jobs(
        self,
        *,
        state: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[JobInfo]:
        """List jobs in planned order (or newest first), optionally filtered."""
        ...

    def leases(self) -> list[LeaseRow]:
        """List the leases that are set: live ones and expired ones not yet reconciled."""
        ...

    def effects(self, job_id: str) -> list[EffectInfo]:
        """List the job's effects in the order they were first started."""
        ...

    def history(self, job_id: str) -> list[HistoryEvent]:
        """Return the job's history, oldest first."""
        ...

    def reconcile(self, *, dry_run: bool = False) -> ReconcileReport:
        """Expire dead leases, mark their starts in doubt, fail exhausted jobs."""
        ...

    def stats(self) -> Stats:
        """Return counts by kind and state, leases, in-doubt effects and queue lag."""
        ...

    def prune(
        self,
        *,
        finished_before: float,
        keep_failed: bool = False,
        forget_keys: bool = False,
        dry_run: bool = False,
        batch_size: int = PRUNE_BATCH_DEFAULT,
        limit: int | None = None,
        archive: ArchiveFn | None = None,
        progress: ProgressFn | None = None,
    ) -> PruneReport:
        """Remove terminal jobs that finished before ``finished_before``, in batches,
        keeping a tombstone of each key unless ``forget_keys`` (see ``model.retention``)."""
        ...

    def record_breaker(
        self,
        host: str,
        *,
        worker: str,
        state: str,
        failures: int,
        last_error: str | None = None,
        cooldown: float | None = None,
    ) -> None:
        """Record that ``worker``'s circuit breaker for ``host`` opened (``state="open"``,
        its probe due in ``cooldown`` seconds) or closed (``state="closed"``).

        One row per ``(host, worker)``, overwritten by each call; a close keeps the
        row's ``opened_at`` and, when ``last_error`` is None, its last error. Called only
        on those transitions, never per request (see ``model.breaker``).
        """
        ...

    def breakers(self) -> list[BreakerRow]:
        """List every recorded breaker row, by host then worker."""
        ...

    def forget_breakers(self, *, changed_before: float) -> int:
        """Remove the breaker rows last changed before ``changed_before``; return how
        many went."""
        ...

    @property
    def config(self) -> Config:
        """The store's effective configuration (TTL, backoff, limits)."""
        ...

    def now(self) -> float:
        """Return the store's current time in seconds (the clock leases are judged by)."""
        ...

    def close(self) -> None:
        """Release the store's resources; the store cannot be used afterwards."""
        ...
