"""``PostgresStore``: the job ledger on PostgreSQL, for workers on many machines.

Same contract and semantics as the reference model (``model.memory.MemoryStore``), with
every decision taken inside one transaction. On the hot path (``lease_next``, ``renew``,
``release``, ``advance``, and an effect's start and record, with ``then``'s advance in
the record) one statement is the whole transaction body: it carries the fence in its
``WHERE``, writes, and appends the history (``queries.CLAIM_ANY`` and the other
``*_NOW`` statements). Only when it changes nothing does the general code run, in the
same transaction: it locks the job row (``FOR UPDATE``), checks the lease to say why
(``LeaseLost``, ``IllegalTransition``), or takes the rare branch (a job with no
attempts left, a workflow edge the single statement does not cover). ``lease_next``
claims with ``FOR UPDATE SKIP LOCKED`` over a partial index of active jobs, so many
workers claim in parallel without waiting for each other.

**The one clock rule.** With ``clock=None``, ``now`` comes from the database server's
clock (the transaction's timestamp, taken inside the statements), so workers on
machines with skewed clocks agree on lease expiry. With an injected clock, that clock is
used throughout (read once per transaction, passed as a bound parameter) and the
server's clock is not consulted. Lease times (``expires_at``, ``run_at``) are seconds
since the epoch in whichever clock is in use.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterable, Mapping, Sequence

from psycopg.rows import DictRow

from impl.postgres import pickup, read, retention, rollup, steps
from impl.postgres import queries as q
from impl.postgres.database import CONNECT_TIMEOUT, Database, Tx, read_schema_version
from impl.postgres.edge import Edges, move
from impl.postgres.effect import EffectFlow, EffectRunner
from impl.postgres.plan import plan_items
from impl.postgres.registry import Registry, stored
from impl.postgres.rows import history_event, job_info, lease_of, locked_job, plain
from impl.postgres.schema import check_not_newer, pending
from impl.postgres.steps import Steps, Transaction
from model.breaker import BreakerMove, BreakerRow, check_before, check_breaker
from model.clock import Clock
from model.config import Config
from model.effectstep import EffectSteps
from model.errors import (
    ConfigError,
    DatabaseLocked,
    IllegalTransition,
    InvalidInput,
    LeaseLost,
)
from model.key import Scalar
from model.record import (
    JSON,
    Detail,
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
from model.validate import check_int, check_seconds, check_text, exhausted_message
from model.workflow import DOWNLOAD, Workflow

URL_PREFIXES = ("postgresql://", "postgres://")


class PostgresStore:
    """The ledger in a PostgreSQL schema (``config.postgres_schema``), via a pool.

    Args:
        url: a ``postgresql://`` URL.
        clock: seconds as float; None (the default) uses the database server's clock.
        config: tunables; default :class:`Config`.

    Raises:
        ConfigError: ``url`` is not a PostgreSQL URL.
        StorageError: the server cannot be reached or the schema cannot be migrated.
        SchemaVersionError: the schema is newer than this code.
    """

    def __init__(
        self, url: str, *, clock: Clock | None = None, config: Config | None = None
    ) -> None:
        if not isinstance(url, str) or not url.startswith(URL_PREFIXES):
            raise ConfigError(
                f"PostgresStore needs a postgresql:// URL, got {url!r}; for a file use "
                "impl.open_store(path)"
            )
        self.config = config if config is not None else Config()
        self.clock = clock
        self._db = Database(
            url, schema=self.config.postgres_schema, clock=clock, config=self.config
        )
        self._flows = Registry()
        self._edges = Edges()
        self._effects = EffectRunner(self._db, self.config, self._flows, self._edges)
        self._listener: pickup.Listener | None = None
        self._listener_lock = threading.Lock()
        try:
            self._db.write(
                "register", lambda tx: self._flows.register(tx, DOWNLOAD), failpoints=False
            )
        except BaseException:
            self._db.close()
            raise

    @property
    def url(self) -> str:
        """The connection URL this store was opened with (``impl.aio`` opens its async
        pool with it)."""
        return self._db.url

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool and the listening connection; later calls raise
        ``StorageError``."""
        self._db.close()
        with self._listener_lock:
            if self._listener is not None:
                self._listener.close()

    # -- workflows -----------------------------------------------------------------

    def register(self, workflow: Workflow) -> None:
        """Register ``workflow``; identical re-registration is a no-op.

        Raises:
            WorkflowConflict: the name is registered with a different definition.
        """
        self._db.check_open()
        if not isinstance(workflow, Workflow):
            raise InvalidInput(f"register needs a Workflow, got {type(workflow).__name__}")
        self._db.write("register", lambda tx: self._flows.register(tx, workflow))

    def workflow(self, name: str) -> Workflow:
        """Return the registered workflow ``name`` or raise ``UnknownWorkflow``."""
        self._db.check_open()
        # A registered definition never changes, so one this store has read needs no
        # transaction (a Worker asks for its job's workflow after every job).
        known = self._flows.cached(name)
        if known is not None:
            return known
        return self._db.read("workflow", lambda tx: self._flows.get(tx, name))

    def workflows(self) -> list[Workflow]:
        """Return every registered workflow, sorted by name."""
        return self._db.read("workflows", stored)

    # -- planning ------------------------------------------------------------------

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
        """Plan a job idempotently; return its id (the job key).

        Raises:
            UnknownWorkflow: ``kind`` is not registered.
            InvalidIdentity: the identity is not str -> scalar.
            IdempotencyConflict: the job exists with a different payload.
        """
        item = Plan(
            identity, payload=payload, priority=priority, max_attempts=max_attempts, run_at=run_at
        )
        return self._db.transact(self.plan_tx("plan", kind, [item]))[0]

    def plan_many(self, kind: str, items: Iterable[Mapping[str, Scalar] | Plan]) -> list[str]:
        """Plan many jobs in one transaction, all or nothing; return ids in item order."""
        plans = [i if isinstance(i, Plan) else Plan(i) for i in items]
        return self._db.transact(self.plan_tx("plan_many", kind, plans))

    # -- the hot path's transactions, written once as steps ------------------------
    #
    # Each ``*_tx`` checks its arguments and returns the transaction as steps
    # (impl.postgres.steps): this store runs it on a pooled connection in the calling
    # thread (Database.transact), impl.aio natively on psycopg's async connections
    # (impl.postgres.asyncdb.AsyncDatabase.transact). One body, so the faces agree.

    def plan_tx(self, op: str, kind: str, items: list[Plan]) -> Transaction[list[str]]:
        """``plan`` (op "plan") or ``plan_many`` (op "plan_many") as steps."""
        self._db.check_open()

        def body() -> Steps[list[str]]:
            flow = yield from self._flows.lookup(kind)
            return (
                yield from plan_items(
                    flow,
                    items,
                    max_attempts=self.config.max_attempts,
                    depth_limit=self.config.json_depth_limit,
                )
            )

        return Transaction(op, body)

    # -- leases --------------------------------------------------------------------

    def lease_next(
        self, worker: str, *, ttl: float | None = None, kinds: Sequence[str] | None = None
    ) -> Lease | None:
        """Lease the eligible job that comes first by (priority desc, run_at, planned order).

        A job met with no attempts left enters the failed state and the search goes on.
        Claims skip rows other workers are locking, so concurrent callers never wait on
        each other and never get the same job.
        """
        try:
            return self._db.transact(self.lease_next_tx(worker, ttl=ttl, kinds=kinds))
        finally:
            listener = self._listener
            if listener is not None:
                listener.claimed()  # hands the turn on (impl.postgres.pickup)

    def lease_next_tx(
        self, worker: str, *, ttl: float | None = None, kinds: Sequence[str] | None = None
    ) -> Transaction[Lease | None]:
        """``lease_next`` as steps (see :meth:`plan_tx`)."""
        self._db.check_open()
        if not isinstance(worker, str) or not worker:
            raise InvalidInput(f"worker must be a non-empty str, got {worker!r}")
        seconds = check_seconds(
            self.config.lease_ttl if ttl is None else ttl, name="ttl", positive=True
        )
        if isinstance(kinds, str):
            raise InvalidInput(f"kinds must be a list of kinds, got the str {kinds!r}")
        wanted = None if kinds is None else list(kinds)

        def body() -> Steps[Lease | None]:
            claim = q.CLAIM_ANY if wanted is None else q.CLAIM_OF_KINDS
            params = {"kinds": wanted, "worker": worker, "ttl": float(seconds)}
            while True:
                found = yield from steps.alone(claim, params)
                if found is None:
                    return None
                if found["job_id"] is not None:
                    if found["old_worker"] is not None:
                        yield from steps.logged(
                            HistoryEvent(
                                found["job_id"],
                                found["updated_at"],
                                Event.EXPIRED,
                                found["old_token"],
                                found["old_worker"],
                            )
                        )
                    yield from steps.logged(
                        HistoryEvent(
                            found["job_id"],
                            found["updated_at"],
                            Event.LEASED,
                            found["token"],
                            worker,
                        )
                    )
                    return lease_of(found)
                # The candidate has no attempts left (it is locked by this transaction).
                row = yield from steps.one(q.JOB, {"job_id": found["candidate"]})
                assert row is not None, "the candidate is locked by this transaction"
                now = yield from steps.now()
                if row["lease_worker"] is not None:
                    yield from steps.log(
                        row["job_id"], Event.EXPIRED, token=row["token"], worker=row["lease_worker"]
                    )
                    yield from steps.run(q.CLEAR_EXPIRED_LEASE, {**_key(row), "now": now})
                if row["attempts"] >= row["max_attempts"]:
                    yield from self._exhaust(row)
                    continue
                granted = yield from steps.one(
                    q.GRANT,
                    {**_key(row), "worker": worker, "expires_at": now + seconds, "now": now},
                )
                assert granted is not None, "the row is locked by this transaction"
                yield from steps.log(
                    granted["job_id"], Event.LEASED, token=granted["token"], worker=worker
                )
                return lease_of(granted)

        return Transaction("lease_next", body)

    def wait_for_work(
        self,
        timeout: float,
        *,
        kinds: Sequence[str] | None = None,
        stop: threading.Event | None = None,
    ) -> bool:
        """Block until a job of ``kinds`` is eligible, for at most ``timeout`` seconds.

        Wakes on the ledger's ``NOTIFY`` (one listening connection per store, see
        :mod:`impl.postgres.pickup`) and when the earliest ``run_at`` or lease expiry
        comes due; while that connection is down it polls. False when the timeout passes
        first or ``stop`` is set.
        """
        self._db.check_open()
        seconds = check_seconds(timeout, name="timeout")
        if isinstance(kinds, str):
            raise InvalidInput(f"kinds must be a list of kinds, got the str {kinds!r}")
        wanted = None if kinds is None else list(kinds)
        with self._listener_lock:
            if self._listener is None or self._listener.pid != os.getpid():
                self._listener = pickup.Listener(
                    self._db.url, self._db.channel, connect_timeout=CONNECT_TIMEOUT
                )
            listener = self._listener
        return pickup.wait_for_work(
            listener,
            lambda: self._db.read("wait_for_work", lambda tx: read.due_in(tx, wanted)),
            kinds=wanted,
            timeout=seconds,
            stop=stop,
        )

    def _exhaust(self, row: DictRow) -> Steps[None]:
        flow = yield from self._flows.lookup(row["kind"])
        error = exhausted_message(row["attempts"], row["max_attempts"])
        now = yield from steps.now()
        yield from steps.run(
            q.ENTER_FAILED, {**_key(row), "failed": flow.failed, "error": error, "now": now}
        )
        yield from steps.log(
            row["job_id"], Event.FAILED, token=row["token"], worker=None, detail={"error": error}
        )

    def renew(self, lease: Lease, *, ttl: float | None = None) -> Lease:
        """Extend the live lease to now + ttl (the default TTL when None)."""
        return self._db.transact(self.renew_tx(lease, ttl=ttl))

    def renew_tx(self, lease: Lease, *, ttl: float | None = None) -> Transaction[Lease]:
        """``renew`` as steps (see :meth:`plan_tx`)."""
        self._db.check_open()
        seconds = check_seconds(
            self.config.lease_ttl if ttl is None else ttl, name="ttl", positive=True
        )

        def body() -> Steps[Lease]:
            if plain(lease):
                fast = yield from steps.one(
                    q.RENEW_NOW, {**_fence_now(lease), "ttl": float(seconds)}
                )
                if fast is not None:
                    yield from steps.logged(
                        HistoryEvent(
                            fast["job_id"],
                            fast["updated_at"],
                            Event.RENEWED,
                            fast["token"],
                            fast["lease_worker"],
                        )
                    )
                    return lease_of(fast)
            lease_, row = yield from locked_job(lease, "renew")
            now = yield from steps.now()
            renewed = yield from steps.one(
                q.RENEW, {**_fence_at(lease_, now), "expires_at": now + seconds}
            )
            _fenced(renewed, lease_, row, "renew")
            assert renewed is not None
            yield from steps.log(
                row["job_id"], Event.RENEWED, token=row["token"], worker=renewed["lease_worker"]
            )
            return lease_of(renewed)

        return Transaction("renew", body)

    def release(self, lease: Lease, *, delay: float = 0.0, reason: str | None = None) -> None:
        """Give the job back unfinished; the attempt is returned, eligible after ``delay``.

        ``reason`` is kept in the history entry's detail (``{"reason": ...}``).
        """
        self._db.transact(self.release_tx(lease, delay=delay, reason=reason))

    def release_tx(
        self, lease: Lease, *, delay: float = 0.0, reason: str | None = None
    ) -> Transaction[None]:
        """``release`` as steps (see :meth:`plan_tx`)."""
        self._db.check_open()
        seconds = check_seconds(delay, name="delay")
        if reason is not None:
            check_text(reason, name="release reason")
        detail = {"reason": reason} if reason is not None else None

        def body() -> Steps[None]:
            # The one-statement path logs an empty detail; a reason takes the general path.
            if plain(lease) and detail is None:
                fast = yield from steps.one(
                    q.RELEASE_NOW,
                    {**_fence_now(lease), "worker": lease.worker, "delay": float(seconds)},
                )
                if fast is not None:
                    yield from steps.logged(
                        HistoryEvent(
                            fast["job_id"],
                            fast["updated_at"],
                            Event.RELEASED,
                            fast["token"],
                            lease.worker,
                        )
                    )
                    yield from steps.announce(lease.kind, later=seconds > 0)
                    return
            lease_, row = yield from locked_job(lease, "release")
            now = yield from steps.now()
            done = yield from steps.one(
                q.RELEASE, {**_fence_at(lease_, now), "run_at": now + seconds}
            )
            _fenced(done, lease_, row, "release")
            yield from steps.log(
                row["job_id"],
                Event.RELEASED,
                token=row["token"],
                worker=row["lease_worker"],
                detail=detail,
            )
            yield from steps.announce(row["kind"], later=seconds > 0)

        return Transaction("release", body)

    def advance(self, lease: Lease, to_state: str) -> bool:
        """Follow one declared edge to ``to_state``; False for a state already reached.

        Raises:
            LeaseLost: the lease is stale or expired.
            IllegalTransition: ``to_state`` is unknown, the failed state, or not reachable
                by one declared edge from the current state.
        """
        return self._db.transact(self.advance_tx(lease, to_state))

    def advance_tx(self, lease: Lease, to_state: str) -> Transaction[bool]:
        """``advance`` as steps (see :meth:`plan_tx`)."""
        self._db.check_open()

        def body() -> Steps[bool]:
            if plain(lease) and (yield from self._advance_fast(lease, to_state)):
                return True
            lease_, row = yield from locked_job(lease, "advance")
            flow = yield from self._flows.lookup(row["kind"])
            return (yield from move(lease_, row, flow, to_state, asked="advance"))

        return Transaction("advance", body)

    def _advance_fast(self, lease: Lease, to_state: str) -> Steps[bool]:
        """Take the edge in one statement when exactly one state can take it; True if done.

        The statement's conditions (the fence, the lease's worker and kind, the current
        state being that one predecessor) make True the answer the general code would
        give; anything else falls back to it.
        """
        flow = self._flows.cached(lease.kind)
        if flow is None:
            return False
        source = self._edges.source(flow, to_state)
        if source is None:
            return False
        detail = {"from": source, "to": to_state}
        moved = yield from steps.alone(
            q.ADVANCE_NOW,
            {
                **_fence_now(lease),
                "worker": lease.worker,
                "kind": flow.name,
                "to_state": to_state,
                "from_state": source,
                "ends": flow.is_terminal(to_state),
                "detail": json.dumps(detail, sort_keys=True),
            },
        )
        if moved is None:
            return False
        yield from steps.logged(
            HistoryEvent(
                moved["job_id"],
                moved["updated_at"],
                Event.ADVANCED,
                moved["token"],
                lease.worker,
                detail,
            )
        )
        return True

    # -- effects -------------------------------------------------------------------

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
        """Run ``fn`` once per op key and record its result; replay a recorded result.

        The start is committed before ``fn`` runs and the result is recorded, fenced by
        the lease, after; no transaction is open while ``fn`` (or an ``on_doubt`` probe)
        runs. ``then``: a state to advance to in the transaction that records (or
        replays) the result, checked before ``fn`` runs (``advance``'s rule); the record
        and the move of the common case are one statement.

        Raises:
            LeaseLost: before ``fn`` runs, or after, when the result cannot be recorded
                because the lease died meanwhile (the op is then in doubt).
            EffectInDoubt: a start of a dead lease and ``on_doubt="raise"``.
            EffectResultError: ``fn`` returned something that is not JSON or is too large.
            IllegalTransition: ``then`` is not a move ``advance`` would make or replay
                (before ``fn``; or after it, the result recorded, when ``fn`` moved the
                job meanwhile).
        """
        self._db.check_open()
        return self._effects.run(lease, op, fn, extras=extras, on_doubt=on_doubt, then=then)

    def effect_steps(
        self,
        lease: Lease,
        op: str,
        *,
        extras: Mapping[str, Scalar] | None = None,
        on_doubt: OnDoubt = "retry",
        then: str | None = None,
    ) -> EffectSteps:
        """``run_effect`` as durable steps (:mod:`model.effectstep`); each step is one
        transaction, so any thread may drive any step."""
        self._db.check_open()
        return self._effects.steps(lease, op, extras=extras, on_doubt=on_doubt, then=then)

    def effect_flow(
        self,
        lease: Lease,
        op: str,
        *,
        extras: Mapping[str, Scalar] | None = None,
        on_doubt: OnDoubt = "retry",
        then: str | None = None,
    ) -> EffectFlow:
        """``run_effect`` as a flow that yields its transactions as well as the user code
        to run (:meth:`EffectRunner.flow`), for a driver that runs them itself."""
        self._db.check_open()
        return self._effects.flow(lease, op, extras=extras, on_doubt=on_doubt, then=then)

    # -- failure and operator actions ----------------------------------------------

    def fail(
        self, lease: Lease, error: str, *, retryable: bool = True, delay: float | None = None
    ) -> None:
        """Record a failed attempt: eligible again after a backoff while attempts remain,
        else the job enters its workflow's failed state with ``error`` kept."""
        self._db.transact(self.fail_tx(lease, error, retryable=retryable, delay=delay))

    def fail_tx(
        self, lease: Lease, error: str, *, retryable: bool = True, delay: float | None = None
    ) -> Transaction[None]:
        """``fail`` as steps (see :meth:`plan_tx`)."""
        self._db.check_open()
        check_text(error, name="error")
        seconds = None if delay is None else check_seconds(delay, name="delay")

        def body() -> Steps[None]:
            lease_, row = yield from locked_job(lease, "fail")
            worker = row["lease_worker"]
            detail: dict[str, Detail] = {"error": error}
            now = yield from steps.now()
            if retryable and row["attempts"] < row["max_attempts"]:
                wait = self.config.backoff(row["attempts"]) if seconds is None else seconds
                detail["retry_at"] = run_at = now + wait
                done = yield from steps.one(
                    q.FAIL_LATER, {**_fence_at(lease_, now), "run_at": run_at, "error": error}
                )
                yield from steps.announce(row["kind"], later=wait > 0)
            else:
                flow = yield from self._flows.lookup(row["kind"])
                done = yield from steps.one(
                    q.FAIL_FINAL,
                    {**_fence_at(lease_, now), "failed": flow.failed, "error": error},
                )
            _fenced(done, lease_, row, "fail")
            yield from steps.log(
                row["job_id"], Event.FAILED, token=row["token"], worker=worker, detail=detail
            )

        return Transaction("fail", body)

    def cancel(self, job_id: str, reason: str) -> None:
        """Operator: move the job into the failed state, fencing out any lease holder."""
        self._db.check_open()
        check_text(reason, name="reason")

        def body(tx: Tx) -> None:
            row = read.job_row(tx, job_id, lock=True)
            flow = self._flows.get(tx, row["kind"])
            if row["state"] == flow.failed:
                return
            if flow.is_terminal(row["state"]):
                raise IllegalTransition(
                    f"cancel of job {job_id}: it already finished in terminal state "
                    f"{row['state']!r}; only unfinished jobs can be cancelled"
                )
            new = tx.one(
                q.CANCEL,
                {
                    "job_id": job_id,
                    "from_state": row["state"],
                    "failed": flow.failed,
                    "reason": reason,
                    "now": tx.now,
                },
            )
            assert new is not None, "the row is locked by this transaction"
            tx.log(
                job_id,
                Event.CANCELLED,
                token=new["token"],
                worker=None,
                detail={"reason": reason},
            )

        self._db.write("cancel", body)

    def retry(self, job_id: str) -> None:
        """Operator: move a failed job back to the state it failed in, attempts reset."""
        self._db.check_open()

        def body(tx: Tx) -> None:
            rollup.hold(tx)
            row = read.job_row(tx, job_id, lock=True)
            flow = self._flows.get(tx, row["kind"])
            if row["state"] != flow.failed:
                raise IllegalTransition(
                    f"retry of job {job_id}: it is in state {row['state']!r}, not the failed "
                    f"state {flow.failed!r}; only failed jobs can be retried"
                )
            rollup.reactivate(tx, row["seq"], row["kind"], flow.failed)
            back = row["failed_from"] if row["failed_from"] is not None else flow.initial
            new = tx.one(
                q.RETRY, {"job_id": job_id, "to_state": back, "failed": flow.failed, "now": tx.now}
            )
            assert new is not None, "the row is locked by this transaction"
            tx.announce(row["kind"])
            tx.log(
                job_id,
                Event.RETRIED,
                token=new["token"],
                worker=None,
                detail={"from": flow.failed, "to": back},
            )

        self._db.write("retry", body)

    # -- reconcile -----------------------------------------------------------------

    def reconcile(self, *, dry_run: bool = False) -> ReconcileReport:
        """Expire dead leases, mark their starts in doubt, fail exhausted jobs; one pass.

        With ``dry_run`` the same pass runs in a transaction that is rolled back, so the
        report says what it would do and nothing changes.
        """

        def body(tx: Tx) -> ReconcileReport:
            expired = tx.all(q.EXPIRE_DEAD_LEASES, {"now": tx.now})
            doubted = tx.all(q.DOUBT_DEAD_STARTS, {"now": tx.now})
            for logged in (*expired, *doubted):
                tx.logged(history_event(logged))
            exhausted = tx.all(q.EXHAUSTED, {"now": tx.now})
            for row in exhausted:
                tx.drive(self._exhaust(row))
            return ReconcileReport(
                leases_expired=len(expired),
                effects_in_doubt=len(doubted),
                jobs_failed=len(exhausted),
            )

        if dry_run:
            return self._db.dry("reconcile", body)
        report = self._db.write("reconcile", body)
        # Maintenance beside the pass (its own short transaction, invisible to callers):
        # a step that cannot get its lock in time is left to the next pass.
        with contextlib.suppress(DatabaseLocked):
            rollup.refresh(self._db)
        return report

    # -- reads ---------------------------------------------------------------------

    def now(self) -> float:
        """Return the store's current time: the injected clock's, else the server's.

        Use it to show how long a lease has left: with the server's clock, the local
        clock may be skewed.
        """
        return self._db.read("now", lambda tx: tx.now)

    def state(self, job_id: str) -> str:
        """Return the job's current state."""
        return str(self._db.read("state", lambda tx: read.job_row(tx, job_id)["state"]))

    def job(self, job_id: str) -> JobInfo:
        """Return a snapshot of the job."""
        return self._db.read("job", lambda tx: job_info(read.job_row(tx, job_id), tx.now))

    def jobs(
        self,
        *,
        state: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[JobInfo]:
        """List jobs in planned order (or newest first), filtered by state and kind."""
        self._db.check_open()
        if limit is not None:
            check_int(limit, name="limit", minimum=0)
        return self._db.read(
            "jobs",
            lambda tx: read.jobs(
                tx, state=state, kind=kind, limit=limit, newest_first=newest_first
            ),
        )

    def leases(self) -> list[LeaseRow]:
        """List leases that are set (live, or expired and not yet reconciled)."""
        return self._db.read("leases", read.leases)

    def effects(self, job_id: str) -> list[EffectInfo]:
        """List the job's effects in the order they were first started."""
        return self._db.read("effects", lambda tx: read.effects(tx, job_id))

    def history(self, job_id: str) -> list[HistoryEvent]:
        """Return the job's history, oldest first."""
        return self._db.read("history", lambda tx: read.history(tx, job_id))

    def stats(self) -> Stats:
        """Counts by kind and state, leases, in-doubt effects, failures and queue lag."""
        rollup.refresh_for_stats(self._db)
        return self._db.read("stats", read.stats)

    # -- retention -----------------------------------------------------------------

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
        self._db.check_open()
        change = check_breaker(
            host,
            worker=worker,
            state=state,
            failures=failures,
            last_error=last_error,
            cooldown=cooldown,
        )

        def body(tx: Tx) -> None:
            params = {
                "host": change.host,
                "worker": change.worker,
                "failures": change.failures,
                "last_error": change.last_error,
                "now": tx.now,
            }
            if change.state is BreakerMove.OPEN:
                assert change.cooldown is not None
                tx.run(q.OPEN_BREAKER, {**params, "until": tx.now + change.cooldown})
            else:
                tx.run(q.CLOSE_BREAKER, params)

        self._db.write("record_breaker", body)

    def breakers(self) -> list[BreakerRow]:
        """List every recorded breaker row, by host then worker."""
        self._db.check_open()
        return self._db.read("breakers", read.breakers)

    def forget_breakers(self, *, changed_before: float) -> int:
        """Remove the breaker rows last changed before ``changed_before``; return how
        many went."""
        self._db.check_open()
        cutoff = check_before(changed_before)
        return self._db.write(
            "forget_breakers", lambda tx: tx.run(q.FORGET_BREAKERS, {"before": cutoff})
        )

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
        keeping a tombstone of each key unless ``forget_keys`` (see ``model.retention``)."""
        self._db.check_open()
        return retention.prune(
            self._db,
            finished_before=check_cutoff(finished_before),
            keep_failed=keep_failed,
            forget_keys=forget_keys,
            dry_run=dry_run,
            batch_size=batch_size,
            limit=limit,
            archive=archive,
            progress=progress,
        )


def pending_migrations(url: str, *, config: Config | None = None) -> list[tuple[int, str]]:
    """Return the migrations (version, name) that opening a store at ``url`` would apply.

    Writes nothing and creates nothing (for ``jobledger migrate --check``): a missing
    schema (``config.postgres_schema``) lacks every migration.

    Raises:
        ConfigError: ``url`` is not a PostgreSQL URL.
        SchemaVersionError: the schema is newer than this code.
        StorageError: the server cannot be reached.
    """
    if not isinstance(url, str) or not url.startswith(URL_PREFIXES):
        raise ConfigError(f"pending_migrations needs a postgresql:// URL, got {url!r}")
    cfg = config if config is not None else Config()
    version = read_schema_version(url, cfg.postgres_schema)
    check_not_newer(version, cfg.postgres_schema)
    return [(m.version, m.name) for m in pending(version)]


def _key(row: DictRow) -> dict[str, object]:
    return {"job_id": row["job_id"], "token": row["token"]}


def _fence_now(lease: Lease) -> dict[str, object]:
    return {"job_id": lease.job_id, "token": lease.token}


def _fence_at(lease: Lease, now: float) -> dict[str, object]:
    return {"job_id": lease.job_id, "token": lease.token, "now": now}


def _fenced(written: DictRow | None, lease: Lease, row: DictRow, op: str) -> None:
    """Raise ``LeaseLost`` when a fenced statement changed nothing."""
    if written is None:
        raise LeaseLost(lease.job_id, lease.token, row["token"], "the fence refused it", op)
