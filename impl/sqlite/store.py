"""``SqliteStore``: the ``Store`` protocol on one SQLite file.

Every decision (eligibility, fencing, transitions) is made inside one ``BEGIN IMMEDIATE``
transaction that also writes its outcome and the job's history, so concurrent threads and
processes on one file serialise on SQLite's write lock and a crash leaves each call either
wholly done or not at all. Connections are per thread and per process: one is never used
from two threads, nor carried across ``fork``. User code (effect functions, doubt probes)
never runs while a transaction is open.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from impl.sqlite import claim, effect, maintenance, pickup, read, retention, rollup
from impl.sqlite import queries as q
from impl.sqlite.advance import advance_in
from impl.sqlite.catalog import Catalog
from impl.sqlite.connection import LedgerConnection, ThreadConnections, Tx, reading
from impl.sqlite.plan import plan_items
from impl.sqlite.row import (
    fence,
    fenceable,
    identity_of,
    json_of,
    move_detail,
    require_job,
    text_of,
)
from impl.sqlite.schema import migrate
from model.breaker import BreakerMove, BreakerRow, check_before, check_breaker
from model.clock import Clock, wall_clock
from model.config import Config
from model.effectstep import EffectSteps, run_steps
from model.errors import (
    IllegalTransition,
    InvalidInput,
)
from model.key import Scalar
from model.record import (
    JSON,
    EffectInfo,
    Event,
    HistoryEvent,
    JobInfo,
    Lease,
    LeaseRow,
    Plan,
    ReconcileReport,
    Stats,
)
from model.retention import (
    PRUNE_BATCH_DEFAULT,
    ArchiveFn,
    ProgressFn,
    PruneReport,
    check_cutoff,
)
from model.store import EffectFn, OnDoubt
from model.validate import check_seconds, check_text
from model.workflow import DOWNLOAD, Workflow

# History event names, as stored.
_RENEWED = Event.RENEWED.value
_RELEASED = Event.RELEASED.value
_ADVANCED = Event.ADVANCED.value
_FAILED = Event.FAILED.value


class SqliteStore:
    """A job ledger in the SQLite file at ``path`` (created and migrated if needed).

    Args:
        path: the database file.
        clock: seconds as float; default the wall clock.
        config: tunables; default :class:`Config`.

    Raises:
        DatabaseCorrupt: the file is not a database (it is left unchanged).
        SchemaVersionError: the database was written by a newer jobledger.
        StorageError: the file cannot be opened or migrated.
    """

    @property
    def worker_ledger_threads(self) -> int:
        """How many threads a :class:`impl.Worker` with several handler threads makes its
        ledger calls on by default (:mod:`impl.ledgerthread`): 1, since SQLite admits one
        writer per file and one thread with one connection spends about half the CPU per
        job that dozens of handler threads spend calling the store themselves
        (bench/README.md); 0 when commits are grouped (``sqlite_group_window``), which
        gathers the writes of the handler threads themselves."""
        return 0 if self._config.sqlite_group_window > 0 else 1

    def __init__(
        self, path: Path, *, clock: Clock | None = None, config: Config | None = None
    ) -> None:
        self._path = Path(path)
        self._clock: Clock = clock if clock is not None else wall_clock
        self._config = config if config is not None else Config()
        self._connections = ThreadConnections(self._path, self._config)
        self._catalog = Catalog()
        self._watch: pickup.ChangeWatch | None = None
        self._watch_lock = threading.Lock()
        try:
            conn = self._connection()
            reading(
                conn, f"open {self._path}", lambda: migrate(conn, str(self._path), self._clock())
            )
            self.register(DOWNLOAD)
        except BaseException:
            self.close()
            raise

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SqliteStore({str(self._path)!r})"

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    def now(self) -> float:
        """Return the store's current time in seconds (the clock leases are judged by).

        Raises:
            StorageError: if the store is closed.
        """
        self._connections.check_open()
        return float(self._clock())

    @property
    def config(self) -> Config:
        """The store's effective configuration."""
        return self._config

    def close(self) -> None:
        """Close the connections this store opened; the store cannot be used afterwards."""
        self._connections.close()
        with self._watch_lock:
            if self._watch is not None and self._watch.pid == os.getpid():
                self._watch.close()

    def _connection(self) -> LedgerConnection:
        """Return this thread's connection in this process, opening it if needed.

        Not public API: tests use it to trace statements and inject faults.
        """
        return self._connections.get()

    # -- workflows ------------------------------------------------------------------------

    def register(self, workflow: Workflow) -> None:
        """Store ``workflow``; idempotent; a different definition of the name raises."""
        conn = self._connection()
        reading(conn, "register", lambda: self._catalog.register(conn, workflow))

    def workflow(self, name: str) -> Workflow:
        """Return the registered workflow ``name`` or raise ``UnknownWorkflow``."""
        conn = self._connection()
        # A registered definition never changes, so one this handle has read is answered
        # without a statement (a Worker asks for its job's workflow after every job).
        known = self._catalog.cached(name)
        if known is not None:
            return known
        return reading(conn, "workflow", lambda: self._catalog.get(conn, name))

    def workflows(self) -> list[Workflow]:
        """Return every registered workflow, by name."""
        conn = self._connection()
        return reading(conn, "workflows", lambda: self._catalog.all(conn))

    # -- planning -------------------------------------------------------------------------

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
        item = Plan(
            identity, payload=payload, priority=priority, max_attempts=max_attempts, run_at=run_at
        )
        return plan_items(
            self._connection(),
            self._clock,
            self._config,
            self._catalog,
            op="plan",
            kind=kind,
            items=[item],
        )[0]

    def plan_many(self, kind: str, items: Iterable[Mapping[str, Scalar] | Plan]) -> list[str]:
        """Plan many jobs in one transaction; return their ids in item order."""
        return plan_items(
            self._connection(),
            self._clock,
            self._config,
            self._catalog,
            op="plan_many",
            kind=kind,
            items=list(items),
        )

    # -- leases ---------------------------------------------------------------------------

    def lease_next(
        self, worker: str, *, ttl: float | None = None, kinds: Sequence[str] | None = None
    ) -> Lease | None:
        """Lease the first eligible job, or return None when there is none.

        Jobs met on the way whose attempts are exhausted enter their failed state, in
        the same transaction.
        """
        if not isinstance(worker, str) or not worker:
            raise InvalidInput(f"worker must be a non-empty str, got {worker!r}")
        span = self._ttl(ttl)
        return claim.lease_next(
            self._connection(),
            self._clock,
            self._catalog,
            worker=worker,
            span=span,
            kinds=claim.EVERY_KIND if kinds is None else claim.kind_filter(_kinds(kinds)),
        )

    def wait_for_work(
        self,
        timeout: float,
        *,
        kinds: Sequence[str] | None = None,
        stop: threading.Event | None = None,
    ) -> bool:
        """Block until a job of ``kinds`` is eligible, for at most ``timeout`` seconds.

        Checks for commits by other connections every few milliseconds (see
        :mod:`impl.sqlite.pickup`) and wakes when the earliest ``run_at`` or lease
        expiry comes due; False when the timeout passes first or ``stop`` is set.
        """
        seconds = check_seconds(timeout, name="timeout")
        return pickup.wait_for_work(
            self._connection(),
            self._clock,
            pickup.due_query(None if kinds is None else _kinds(kinds)),
            watch=self._change_watch(),
            timeout=seconds,
            stop=stop,
        )

    def _change_watch(self) -> pickup.ChangeWatch:
        """The one watch for commits that this store's waiters share (in this process)."""
        with self._watch_lock:
            if self._watch is None or self._watch.pid != os.getpid():
                # One inherited through fork is never used (nor closed) here.
                self._watch = pickup.ChangeWatch(self._path, self._config)
            return self._watch

    def renew(self, lease: Lease, *, ttl: float | None = None) -> Lease:
        """Extend a live lease to now + ttl (default: the configured lease TTL)."""
        span = self._ttl(ttl)
        conn = self._connection()
        with Tx(conn, "renew", self._clock) as tx:
            if not fenceable(lease):
                fence(conn, lease, tx.now, "renew")  # raises the reason it is refused
            expires_at = tx.now + span
            renewed = conn.execute(
                q.RENEW_LEASE,
                {
                    "expires_at": expires_at,
                    "now": tx.now,
                    "job_id": lease.job_id,
                    "token": lease.token,
                },
            ).fetchone()
            if renewed is None:
                fence(conn, lease, tx.now, "renew")  # raises the reason it was refused
                raise AssertionError("a fenced renew updated nothing")  # pragma: no cover
            kind, identity, payload, state, attempts, holder = renewed
            tx.history(lease.job_id, _RENEWED, lease.token, holder)
        return Lease(
            job_id=lease.job_id,
            kind=kind,
            token=lease.token,
            worker=holder,
            expires_at=expires_at,
            attempt=attempts,
            state=state,
            identity=identity_of(identity),
            payload=json_of(payload),
        )

    def release(self, lease: Lease, *, delay: float = 0.0, reason: str | None = None) -> None:
        """Give the job back (and the attempt); eligible again after ``delay`` seconds.

        ``reason`` is kept in the history entry's detail (``{"reason": ...}``).
        """
        delay = check_seconds(delay, name="delay")
        if reason is not None:
            check_text(reason, name="release reason")
        detail = text_of({"reason": reason}) if reason is not None else "{}"
        conn = self._connection()
        with Tx(conn, "release", self._clock) as tx:
            row = fence(conn, lease, tx.now, "release")
            conn.execute(
                q.RELEASE_LEASE,
                {
                    "run_at": tx.now + delay,
                    "now": tx.now,
                    "job_id": lease.job_id,
                    "token": row[0],
                },
            )
            tx.history(lease.job_id, _RELEASED, row[0], row[1], detail)

    def advance(self, lease: Lease, to_state: str) -> bool:
        """Follow one declared edge; False for a replay of the current or a passed state."""
        conn = self._connection()
        with Tx(conn, "advance", self._clock) as tx:
            return advance_in(conn, tx, self._catalog, lease, to_state)

    def fail(
        self, lease: Lease, error: str, *, retryable: bool = True, delay: float | None = None
    ) -> None:
        """Record a failed attempt: retry after a backoff, or enter the failed state."""
        check_text(error, name="error")
        if delay is not None:
            delay = check_seconds(delay, name="delay")
        conn = self._connection()
        with Tx(conn, "fail", self._clock) as tx:
            token, holder, _, attempts, max_attempts, _, kind = fence(conn, lease, tx.now, "fail")
            job_id = lease.job_id
            now = tx.now
            if retryable and attempts < max_attempts:
                run_at = now + (delay if delay is not None else self._config.backoff(attempts))
                conn.execute(
                    q.RETRY_LATER,
                    {
                        "run_at": run_at,
                        "error": error,
                        "now": now,
                        "job_id": job_id,
                        "token": token,
                    },
                )
                tx.history(
                    job_id, _FAILED, token, holder, text_of({"error": error, "retry_at": run_at})
                )
            else:
                maintenance.enter_failed(
                    tx, self._catalog.get(conn, kind), job_id, token, error, worker=holder
                )

    # -- operator actions -----------------------------------------------------------------

    def cancel(self, job_id: str, reason: str) -> None:
        """Operator: move the job into the failed state, fencing out any holder."""
        check_text(reason, name="reason")
        conn = self._connection()
        with Tx(conn, "cancel", self._clock) as tx:
            row = require_job(conn, job_id)
            workflow = self._catalog.get(conn, row.kind)
            if row.state == workflow.failed:
                return
            if workflow.is_terminal(row.state):
                raise IllegalTransition(
                    f"cancel of job {job_id}: it already ended in terminal state "
                    f"{row.state!r}; there is nothing to cancel"
                )
            token = conn.execute(
                q.CANCEL_JOB,
                {"failed": workflow.failed, "error": reason, "now": tx.now, "job_id": job_id},
            ).fetchone()[0]
            tx.history(job_id, Event.CANCELLED.value, int(token), None, text_of({"reason": reason}))

    def retry(self, job_id: str) -> None:
        """Operator: move a failed job back to the state it failed in, attempts reset."""
        conn = self._connection()
        with Tx(conn, "retry", self._clock) as tx:
            row = require_job(conn, job_id)
            workflow = self._catalog.get(conn, row.kind)
            if row.state != workflow.failed:
                raise IllegalTransition(
                    f"retry of job {job_id}: it is in state {row.state!r}, not in the failed "
                    f"state {workflow.failed!r}; only failed jobs can be retried"
                )
            rollup.reactivate(conn, row.seq, row.kind, workflow.failed)
            token, state = conn.execute(
                q.RETRY_JOB, {"now": tx.now, "job_id": job_id, "failed": workflow.failed}
            ).fetchone()
            tx.history(
                job_id,
                Event.RETRIED.value,
                int(token),
                None,
                move_detail(workflow.failed, str(state)),
            )

    # -- effects --------------------------------------------------------------------------

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

        With ``then``, the job advances to it in the transaction that records (or
        replays) the result (see ``Store.run_effect``)."""
        return run_steps(
            self.effect_steps(lease, op, extras=extras, on_doubt=on_doubt, then=then),
            fn,
            on_doubt,
        )

    def effect_steps(
        self,
        lease: Lease,
        op: str,
        *,
        extras: Mapping[str, Scalar] | None = None,
        on_doubt: OnDoubt = "retry",
        then: str | None = None,
    ) -> EffectSteps:
        """``run_effect`` as durable steps (:mod:`model.effectstep`); drive every step
        from the thread that called this (its connection is that thread's)."""
        return effect.effect_steps(
            self._connection(),
            self._clock,
            self._config,
            lease,
            op,
            catalog=self._catalog,
            extras=extras,
            on_doubt=on_doubt,
            then=then,
        )

    # -- reads ----------------------------------------------------------------------------

    def state(self, job_id: str) -> str:
        """Return the job's current state."""
        conn = self._connection()
        return reading(conn, "state", lambda: read.state(conn, job_id))

    def job(self, job_id: str) -> JobInfo:
        """Return a snapshot of the job."""
        conn = self._connection()
        return reading(conn, "job", lambda: require_job(conn, job_id).info(self._clock()))

    def jobs(
        self,
        *,
        state: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[JobInfo]:
        """List jobs in planned order (or newest first), optionally filtered."""
        conn = self._connection()
        return reading(
            conn,
            "jobs",
            lambda: read.jobs(
                conn, self._clock(), state=state, kind=kind, limit=limit, newest_first=newest_first
            ),
        )

    def leases(self) -> list[LeaseRow]:
        """List the leases that are set: live ones and expired ones not yet reconciled."""
        conn = self._connection()
        return reading(conn, "leases", lambda: read.leases(conn, self._clock()))

    def effects(self, job_id: str) -> list[EffectInfo]:
        """List the job's effects in the order they were first started."""
        conn = self._connection()
        return reading(conn, "effects", lambda: read.effects(conn, job_id))

    def history(self, job_id: str) -> list[HistoryEvent]:
        """Return the job's history, oldest first."""
        conn = self._connection()
        return reading(conn, "history", lambda: read.history(conn, job_id))

    def reconcile(self, *, dry_run: bool = False) -> ReconcileReport:
        """Expire dead leases, mark their starts in doubt, fail exhausted jobs."""
        return maintenance.reconcile(
            self._connection(), self._clock, self._catalog, dry_run=dry_run
        )

    def stats(self) -> Stats:
        """Return counts by kind and state, leases, in-doubt effects and queue lag."""
        return maintenance.stats(self._connection(), self._clock, self._catalog)

    # -- retention ------------------------------------------------------------------------

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
        """Remove terminal jobs that finished before ``finished_before``, in short batches,
        keeping a tombstone of each key unless ``forget_keys`` (see ``model.retention``);
        then give the freed pages back to the file system (:func:`retention.reclaim`)."""
        cutoff = check_cutoff(finished_before)
        conn = self._connection()
        report = retention.prune(
            conn,
            self._clock,
            finished_before=cutoff,
            keep_failed=keep_failed,
            forget_keys=forget_keys,
            dry_run=dry_run,
            batch_size=batch_size,
            limit=limit,
            archive=archive,
            progress=progress,
        )
        if report.batches:
            retention.reclaim(conn, self._clock)
        return report

    # -- circuit breakers ------------------------------------------------------------------

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
        """Upsert the row of ``(host, worker)``: opened (probe after ``cooldown``) or
        closed (``opened_at`` and, unless given, ``last_error`` kept)."""
        change = check_breaker(
            host,
            worker=worker,
            state=state,
            failures=failures,
            last_error=last_error,
            cooldown=cooldown,
        )
        conn = self._connection()
        with Tx(conn, "record_breaker", self._clock) as tx:
            params = {
                "host": change.host,
                "worker": change.worker,
                "failures": change.failures,
                "last_error": change.last_error,
                "now": tx.now,
            }
            if change.state is BreakerMove.OPEN:
                assert change.cooldown is not None
                conn.execute(q.OPEN_BREAKER, {**params, "until": tx.now + change.cooldown})
            else:
                conn.execute(q.CLOSE_BREAKER, params)

    def breakers(self) -> list[BreakerRow]:
        """List every recorded breaker row, by host then worker."""
        conn = self._connection()
        return reading(conn, "breakers", lambda: read.breakers(conn))

    def forget_breakers(self, *, changed_before: float) -> int:
        """Remove the breaker rows last changed before ``changed_before``; return how
        many went."""
        cutoff = check_before(changed_before)
        conn = self._connection()
        with Tx(conn, "forget_breakers", self._clock):
            return int(conn.execute(q.DELETE_BREAKERS_BEFORE, (cutoff,)).rowcount)

    # -- helpers --------------------------------------------------------------------------

    def _ttl(self, ttl: float | None) -> float:
        return check_seconds(
            self._config.lease_ttl if ttl is None else ttl, name="ttl", positive=True
        )


def _kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    if isinstance(kinds, str):
        raise InvalidInput(
            f"kinds must be a sequence of kind names, got the str {kinds!r}; pass [{kinds!r}]"
        )
    return tuple(str(k) for k in kinds)
