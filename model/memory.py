"""``MemoryStore``: the reference semantics of jobledger, in plain Python.

This is the executable specification every backend is checked against. It is pure: no
I/O, no threads, time only from the injected clock. Each public method reads the clock
once and decides every question (eligibility, fencing, transitions, doubt) with its own
plain logic, so a bug in a backend's SQL cannot hide here too.

Crash semantics: a worker that dies simply stops calling; its lease stays set until it
expires by the clock, and an effect whose start was recorded but whose result was not is
in doubt once that lease is dead. :meth:`MemoryStore.begin_effect` and
:meth:`MemoryStore.finish_effect` split ``run_effect`` at the point where ``fn`` runs, so
a test can tell the model "the process died after the start was recorded"; the same
split, as a generator, is :meth:`MemoryStore.effect_steps` (:mod:`model.effectstep`), and
an async task cancelled while ``fn`` runs is that same death (model/SEMANTICS.md).
"""

from __future__ import annotations

import copy
import functools
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from attrs import define, field

from model.breaker import BreakerMove, BreakerRow, check_before, check_breaker
from model.clock import Clock, wall_clock
from model.config import Config
from model.effectstep import EffectSteps, Probe, RunFn, run_steps
from model.errors import (
    EffectInDoubt,
    EffectResultError,
    IdempotencyConflict,
    IllegalTransition,
    InvalidInput,
    JobPruned,
    LeaseLost,
    StorageError,
    UnknownJob,
    UnknownWorkflow,
    WorkflowConflict,
)
from model.key import Scalar, check_scalars, job_key, op_key
from model.record import (
    JSON,
    Detail,
    DoubtInfo,
    EffectContext,
    EffectInfo,
    EffectStatus,
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
    PRUNED_REASON,
    ArchiveFn,
    ProgressFn,
    PrunedJob,
    PruneReport,
    Tombstone,
    check_batch_size,
    check_cutoff,
    check_limit,
)
from model.store import EffectFn, OnDoubt
from model.validate import (
    check_int,
    check_on_doubt,
    check_seconds,
    check_text,
    encode_payload,
    encode_result,
    exhausted_message,
)
from model.workflow import DOWNLOAD, THEN, Workflow, edge_to

_F = TypeVar("_F", bound=Callable[..., Any])

WAIT_SLICE = 0.05
"""Longest sleep of ``wait_for_work`` between two looks at the jobs (seconds)."""


def _atomic(method: _F) -> _F:
    """Run ``method`` under the store's lock: each public call is one atomic step.

    The model has no threads of its own, but a ``Worker`` renews leases from a
    background thread; the lock makes every call indivisible, as a transaction is.
    Every call then wakes the callers of ``wait_for_work``, which look again.
    """

    @functools.wraps(method)
    def wrapper(self: MemoryStore, *args: object, **kwargs: object) -> object:
        with self._changed:
            try:
                return method(self, *args, **kwargs)
            finally:
                self._changed.notify_all()

    return wrapper  # type: ignore[return-value]


def _config_or_default(config: Config | None) -> Config:
    return config if config is not None else Config()


@define
class _Job:
    job_id: str
    seq: int
    kind: str
    identity: dict[str, Scalar]
    payload_text: str
    state: str
    attempts: int
    max_attempts: int
    priority: int
    run_at: float
    token: int
    created_at: float
    updated_at: float
    lease_worker: str | None = None
    lease_expires_at: float | None = None
    last_error: str | None = None
    failed_from: str | None = None

    def live(self, now: float) -> bool:
        return (
            self.lease_worker is not None
            and self.lease_expires_at is not None
            and now < self.lease_expires_at
        )


@define
class _Effect:
    job_id: str
    op: str
    op_key: str
    extras: dict[str, Scalar]
    status: EffectStatus
    started_at: float
    token: int
    started_by: str
    seq: int
    result_text: str | None = None
    finished_at: float | None = None


@define
class Started:
    """What :meth:`MemoryStore.begin_effect` decided: replay, or run ``fn`` now."""

    context: EffectContext
    replay: bool = False
    result: JSON = None


@define
class MemoryStore:
    """The in-memory reference store (CONTRACT section 2, semantics of section 3).

    Args:
        clock: seconds as float; default wall time.
        config: tunables; default :class:`Config`.
    """

    clock: Clock | None = field(default=None, kw_only=True)
    config: Config = field(default=None, kw_only=True, converter=_config_or_default)
    _workflows: dict[str, Workflow] = field(factory=dict, init=False)
    _jobs: dict[str, _Job] = field(factory=dict, init=False)
    _effects: dict[str, _Effect] = field(factory=dict, init=False)
    _history: dict[str, list[HistoryEvent]] = field(factory=dict, init=False)
    _tombstones: dict[str, Tombstone] = field(factory=dict, init=False)
    _breakers: dict[tuple[str, str], BreakerRow] = field(factory=dict, init=False)
    _seq: int = field(default=0, init=False)
    _closed: bool = field(default=False, init=False)
    _lock: threading.RLock = field(factory=threading.RLock, init=False, eq=False)
    _changed: threading.Condition = field(init=False, eq=False)

    @_changed.default
    def _condition(self) -> threading.Condition:
        return threading.Condition(self._lock)

    def __attrs_post_init__(self) -> None:
        self._register(DOWNLOAD)

    # -- plumbing ------------------------------------------------------------------

    def _now(self) -> float:
        if self._closed:
            raise StorageError("this store is closed; open a new one with open_store")
        return float((self.clock or wall_clock)())

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def now(self) -> float:
        """Return the store's current time in seconds."""
        return self._now()

    def close(self) -> None:
        """Mark the store closed; later calls raise."""
        self._closed = True

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _log(
        self,
        job: _Job,
        now: float,
        event: Event,
        *,
        token: int | None = None,
        worker: str | None = None,
        detail: Mapping[str, Detail] | None = None,
    ) -> None:
        self._history.setdefault(job.job_id, []).append(
            HistoryEvent(
                job_id=job.job_id,
                at=now,
                event=event,
                token=job.token if token is None else token,
                worker=worker,
                detail=dict(detail or {}),
            )
        )

    def _get(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            stone = self._tombstones.get(job_id) if isinstance(job_id, str) else None
            if stone is not None:
                raise JobPruned(
                    job_id,
                    kind=stone.kind,
                    state=stone.state,
                    finished_at=stone.finished_at,
                    pruned_at=stone.pruned_at,
                )
            raise UnknownJob(job_id)
        return job

    def _flow(self, kind: str) -> Workflow:
        flow = self._workflows.get(kind)
        if flow is None:
            raise UnknownWorkflow(
                f"no workflow named {kind!r} is registered; known: "
                f"{sorted(self._workflows)}; call store.register(Workflow(...)) first"
            )
        return flow

    def _check(self, lease: Lease, now: float, op: str) -> _Job:
        if not isinstance(lease, Lease):
            raise InvalidInput(f"{op} needs a Lease from lease_next, got {type(lease).__name__}")
        if lease.job_id in self._tombstones:
            # A pruned job finished long ago: any lease of it is lost, and a worker is
            # told so the way it is told of every lost lease.
            raise LeaseLost(lease.job_id, lease.token, None, PRUNED_REASON, op)
        job = self._get(lease.job_id)
        if lease.token != job.token:
            raise LeaseLost(job.job_id, lease.token, job.token, "the token is stale", op)
        if not job.live(now):
            raise LeaseLost(job.job_id, lease.token, job.token, "the lease expired", op)
        return job

    def _lease_of(self, job: _Job) -> Lease:
        assert job.lease_worker is not None
        assert job.lease_expires_at is not None
        return Lease(
            job_id=job.job_id,
            kind=job.kind,
            token=job.token,
            worker=job.lease_worker,
            expires_at=job.lease_expires_at,
            attempt=job.attempts,
            state=job.state,
            identity=dict(job.identity),
            payload=json.loads(job.payload_text),
        )

    def _end_lease(self, job: _Job) -> None:
        job.lease_worker = None
        job.lease_expires_at = None

    def _enter_failed(self, job: _Job, now: float, error: str) -> None:
        flow = self._flow(job.kind)
        job.failed_from = job.state
        job.state = flow.failed
        job.last_error = error
        self._end_lease(job)
        job.updated_at = now

    # -- workflows -----------------------------------------------------------------

    def _register(self, workflow: Workflow) -> None:
        known = self._workflows.get(workflow.name)
        if known is None:
            self._workflows[workflow.name] = workflow
        elif known != workflow:
            raise WorkflowConflict(
                f"workflow {workflow.name!r} is already registered with a different "
                f"definition (stored: {known.definition()}, given: {workflow.definition()}); "
                "use a new name for a changed workflow"
            )

    @_atomic
    def register(self, workflow: Workflow) -> None:
        """Register ``workflow``; identical re-registration is a no-op.

        Raises:
            WorkflowConflict: the name is registered with a different definition.
        """
        self._now()
        if not isinstance(workflow, Workflow):
            raise InvalidInput(f"register needs a Workflow, got {type(workflow).__name__}")
        self._register(workflow)

    @_atomic
    def workflow(self, name: str) -> Workflow:
        """Return the registered workflow ``name``."""
        return self._flow(name)

    @_atomic
    def workflows(self) -> list[Workflow]:
        """Return every registered workflow, sorted by name."""
        return [self._workflows[n] for n in sorted(self._workflows)]

    # -- planning ------------------------------------------------------------------

    @_atomic
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
        now = self._now()
        item = Plan(
            identity, payload=payload, priority=priority, max_attempts=max_attempts, run_at=run_at
        )
        return self._plan_items(kind, [item], now)[0]

    @_atomic
    def plan_many(self, kind: str, items: Iterable[Mapping[str, Scalar] | Plan]) -> list[str]:
        """Plan many jobs at once, all or nothing; return their ids in item order."""
        now = self._now()
        plans = [i if isinstance(i, Plan) else Plan(i) for i in items]
        return self._plan_items(kind, plans, now)

    def _plan_items(self, kind: str, items: list[Plan], now: float) -> list[str]:
        flow = self._flow(kind)
        # Validate everything before changing anything, so a bad item plans nothing.
        prepared: list[tuple[str, dict[str, Scalar], str, Plan]] = []
        batch: dict[str, str] = {}
        for item in items:
            jid = job_key(kind, item.identity)
            text = encode_payload(item.payload, depth_limit=self.config.json_depth_limit)
            check_int(item.priority, name="priority")
            if item.max_attempts is not None:
                check_int(item.max_attempts, name="max_attempts", minimum=1)
            if item.run_at is not None:
                check_seconds(item.run_at, name="run_at")
            known = self._jobs.get(jid)
            stored = known.payload_text if known is not None else batch.get(jid)
            # A pruned job's key stays planned; its payload is not kept, so it cannot
            # conflict (see model.retention).
            if stored is not None and stored != text and jid not in self._tombstones:
                raise IdempotencyConflict(
                    f"job {jid} ({kind} {dict(item.identity)}) is already planned with payload "
                    f"{stored}, not {text}; a job's payload is fixed at planning: plan a "
                    "different identity, or keep the payload"
                )
            batch[jid] = text
            prepared.append((jid, check_scalars(item.identity, what="identity"), text, item))
        ids = []
        for jid, ident, text, item in prepared:
            if jid not in self._jobs and jid not in self._tombstones:
                job = _Job(
                    job_id=jid,
                    seq=self._next_seq(),
                    kind=kind,
                    identity=ident,
                    payload_text=text,
                    state=flow.initial,
                    attempts=0,
                    max_attempts=(
                        item.max_attempts
                        if item.max_attempts is not None
                        else self.config.max_attempts
                    ),
                    priority=item.priority,
                    run_at=float(item.run_at) if item.run_at is not None else now,
                    token=0,
                    created_at=now,
                    updated_at=now,
                )
                self._jobs[jid] = job
                self._log(job, now, Event.PLANNED)
            ids.append(jid)
        return ids

    # -- leases --------------------------------------------------------------------

    @_atomic
    def lease_next(
        self, worker: str, *, ttl: float | None = None, kinds: Sequence[str] | None = None
    ) -> Lease | None:
        """Lease the eligible job that comes first by (priority desc, run_at, planned order).

        A job met with no attempts left enters the failed state and the search goes on.
        """
        now = self._now()
        if not isinstance(worker, str) or not worker:
            raise InvalidInput(f"worker must be a non-empty str, got {worker!r}")
        seconds = check_seconds(
            self.config.lease_ttl if ttl is None else ttl, name="ttl", positive=True
        )
        if isinstance(kinds, str):
            raise InvalidInput(f"kinds must be a list of kinds, got the str {kinds!r}")
        wanted = None if kinds is None else set(kinds)
        candidates = sorted(
            (
                j
                for j in self._jobs.values()
                if (wanted is None or j.kind in wanted)
                and not self._flow(j.kind).is_terminal(j.state)
                and not j.live(now)
                and j.run_at <= now
            ),
            key=lambda j: (-j.priority, j.run_at, j.seq),
        )
        for job in candidates:
            expired_holder = job.lease_worker
            if expired_holder is not None:
                self._log(job, now, Event.EXPIRED, worker=expired_holder)
                self._end_lease(job)
                job.updated_at = now
            if job.attempts >= job.max_attempts:
                error = exhausted_message(job.attempts, job.max_attempts)
                self._enter_failed(job, now, error)
                self._log(job, now, Event.FAILED, detail={"error": error})
                continue
            job.token += 1
            job.attempts += 1
            job.lease_worker = worker
            job.lease_expires_at = now + seconds
            job.updated_at = now
            self._log(job, now, Event.LEASED, worker=worker)
            return self._lease_of(job)
        return None

    def wait_for_work(
        self,
        timeout: float,
        *,
        kinds: Sequence[str] | None = None,
        stop: threading.Event | None = None,
    ) -> bool:
        """Block until a job of ``kinds`` is eligible, for at most ``timeout`` seconds.

        True as soon as one is eligible by the store's clock (at once if one already is),
        False when the timeout passes first or ``stop`` is set. The model looks again after
        every call made on it (from other threads), when the earliest ``run_at`` or lease
        expiry comes due (read as wall-clock seconds from now), and every
        :data:`WAIT_SLICE` seconds (an injected clock moves without a call).
        """
        seconds = check_seconds(timeout, name="timeout")
        if isinstance(kinds, str):
            raise InvalidInput(f"kinds must be a list of kinds, got the str {kinds!r}")
        wanted = None if kinds is None else set(kinds)
        deadline = time.monotonic() + seconds
        with self._changed:
            while True:
                now = self._now()
                due = self._next_due(wanted)
                if due is not None and due <= now:
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or (stop is not None and stop.is_set()):
                    return False
                pause = min(left, WAIT_SLICE)
                if due is not None:
                    pause = min(pause, due - now)
                self._changed.wait(pause)

    def _next_due(self, wanted: set[str] | None) -> float | None:
        """When the first job of ``wanted`` kinds becomes eligible by the clock: the later
        of its ``run_at`` and its lease's expiry; None when no such job is unfinished.

        A job with no attempts left counts too: leasing it moves it to its failed state.
        """
        due: float | None = None
        for job in self._jobs.values():
            if wanted is not None and job.kind not in wanted:
                continue
            if self._flow(job.kind).is_terminal(job.state):
                continue
            at = job.run_at
            if job.lease_worker is not None and job.lease_expires_at is not None:
                at = max(at, job.lease_expires_at)
            if due is None or at < due:
                due = at
        return due

    @_atomic
    def renew(self, lease: Lease, *, ttl: float | None = None) -> Lease:
        """Extend the live lease to now + ttl (default TTL when None)."""
        now = self._now()
        seconds = check_seconds(
            self.config.lease_ttl if ttl is None else ttl, name="ttl", positive=True
        )
        job = self._check(lease, now, "renew")
        job.lease_expires_at = now + seconds
        job.updated_at = now
        self._log(job, now, Event.RENEWED, worker=job.lease_worker)
        return self._lease_of(job)

    @_atomic
    def release(self, lease: Lease, *, delay: float = 0.0, reason: str | None = None) -> None:
        """Give the job back unfinished; the attempt is returned, eligible after ``delay``.

        ``reason`` (why the job was given back, e.g. "disk full") is kept in the history
        entry's detail as ``{"reason": ...}``; without it the detail is empty.
        """
        now = self._now()
        seconds = check_seconds(delay, name="delay")
        if reason is not None:
            check_text(reason, name="release reason")
        job = self._check(lease, now, "release")
        worker = job.lease_worker
        job.attempts -= 1
        self._end_lease(job)
        job.run_at = now + seconds
        job.updated_at = now
        detail = {"reason": reason} if reason is not None else None
        self._log(job, now, Event.RELEASED, worker=worker, detail=detail)

    # -- the state machine -----------------------------------------------------------

    @_atomic
    def advance(self, lease: Lease, to_state: str) -> bool:
        """Follow one declared edge to ``to_state``; False for a state already reached.

        Raises:
            LeaseLost: the lease is stale or expired.
            IllegalTransition: ``to_state`` is unknown, the failed state, or not reachable
                by one declared edge from the current state.
        """
        now = self._now()
        job = self._check(lease, now, "advance")
        return self._move(job, to_state, now, asked="advance")

    def _move(self, job: _Job, to_state: str, now: float, *, asked: str) -> bool:
        """``advance``'s decision and change for a job whose lease was just checked."""
        flow = self._flow(job.kind)
        if not edge_to(flow, job.job_id, job.state, to_state, asked=asked):
            return False
        previous = job.state
        worker = job.lease_worker
        job.state = to_state
        if flow.is_terminal(to_state):
            self._end_lease(job)
        job.updated_at = now
        self._log(
            job, now, Event.ADVANCED, worker=worker, detail={"from": previous, "to": to_state}
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

        ``then``: a state to advance to in the same atomic step that records (or replays)
        the result, as ``advance(lease, then)`` would right after, with no crash between.
        It is checked before ``fn`` runs: a ``then`` that ``advance`` would refuse raises
        ``IllegalTransition`` with nothing recorded and ``fn`` not called.

        Raises:
            LeaseLost: before ``fn`` runs, or after, when the result cannot be recorded
                because the lease died meanwhile (the op is then in doubt).
            EffectInDoubt: a start of a dead lease and ``on_doubt="raise"``.
            EffectResultError: ``fn`` returned something that is not JSON or is too large.
            IllegalTransition: ``then`` is not a move ``advance`` would make or replay.
        """
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
        """``run_effect`` as durable steps (see :mod:`model.effectstep`): each step is
        one atomic call; ``fn`` and the probe run between them, outside the lock."""
        check_on_doubt(on_doubt)
        begun = self._begin(lease, op, extras, on_doubt, probe=True, then=then)
        if isinstance(begun, DoubtInfo):
            probed = yield Probe(begun)
            ctx = self._context(lease, begun)
            if probed is not None:
                return self.record_probe(lease, ctx, probed, then=then)
            begun = self._begin(lease, op, extras, on_doubt, probe=False, then=then)
            assert isinstance(begun, Started)
        if begun.replay:
            return begun.result
        try:
            result = yield RunFn(begun.context)
        except Exception:
            self.abort_effect(begun.context)
            raise
        return self.finish_effect(lease, begun.context, result, then=then)

    def _context(self, lease: Lease, info: DoubtInfo) -> EffectContext:
        return EffectContext(
            job_id=info.job_id,
            op=info.op,
            op_key=info.op_key,
            token=lease.token,
            attempt=lease.attempt,
        )

    def begin_effect(
        self,
        lease: Lease,
        op: str,
        *,
        extras: Mapping[str, Scalar] | None = None,
        on_doubt: OnDoubt = "retry",
        then: str | None = None,
    ) -> Started:
        """The first half of ``run_effect``: check, replay, resolve doubt, record the start."""
        check_on_doubt(on_doubt)
        begun = self._begin(lease, op, extras, on_doubt, probe=True, then=then)
        if isinstance(begun, DoubtInfo):
            assert callable(on_doubt)
            probed = on_doubt(begun)
            ctx = self._context(lease, begun)
            if probed is not None:
                result = self.record_probe(lease, ctx, probed, then=then)
                return Started(ctx, replay=True, result=result)
            begun = self._begin(lease, op, extras, on_doubt, probe=False, then=then)
            assert isinstance(begun, Started)
        return begun

    @_atomic
    def _begin(
        self,
        lease: Lease,
        op: str,
        extras: Mapping[str, Scalar] | None,
        on_doubt: OnDoubt,
        *,
        probe: bool,
        then: str | None = None,
    ) -> Started | DoubtInfo:
        """Check, replay (taking ``then``), or record the start; a pending start with a
        callable ``on_doubt`` and ``probe`` returns the probe's question instead (nothing
        written)."""
        now = self._now()
        job = self._check(lease, now, "run_effect")
        if then is not None:
            edge_to(self._flow(job.kind), job.job_id, job.state, then, asked=THEN)
        key = op_key(job.job_id, op, extras)
        ctx = EffectContext(
            job_id=job.job_id, op=op, op_key=key, token=job.token, attempt=job.attempts
        )
        effect = self._effects.get(key)
        if effect is not None and effect.status is EffectStatus.DONE:
            assert effect.result_text is not None
            if then is not None:
                self._move(job, then, now, asked=THEN)
            return Started(ctx, replay=True, result=json.loads(effect.result_text))
        if effect is not None:
            if on_doubt == "raise":
                raise EffectInDoubt(job.job_id, op, key, effect.token, effect.started_by)
            if probe and callable(on_doubt):
                return DoubtInfo(
                    job_id=job.job_id,
                    op=op,
                    op_key=key,
                    started_at=effect.started_at,
                    started_token=effect.token,
                    started_by=effect.started_by,
                )
            self._log(job, now, Event.EFFECT_IN_DOUBT, worker=lease.worker, detail={"op": op})
        self._effects[key] = _Effect(
            job_id=job.job_id,
            op=op,
            op_key=key,
            extras=check_scalars(extras or {}, what="extras"),
            status=EffectStatus.STARTED,
            started_at=now,
            token=job.token,
            started_by=lease.worker,
            seq=effect.seq if effect is not None else self._next_seq(),
        )
        self._log(job, now, Event.EFFECT_STARTED, worker=lease.worker, detail={"op": op})
        return Started(ctx)

    @_atomic
    def record_probe(
        self, lease: Lease, ctx: EffectContext, probed: object, *, then: str | None = None
    ) -> JSON:
        """Record the probe's answer as the op's result, fenced by the lease (and take
        ``then``, as :meth:`finish_effect` does)."""
        text = encode_result(
            probed, limit=self.config.result_limit, depth_limit=self.config.json_depth_limit
        )
        now = self._now()
        job = self._check(lease, now, "run_effect")
        effect = self._effects[ctx.op_key]
        self._log(job, now, Event.EFFECT_IN_DOUBT, worker=lease.worker, detail={"op": ctx.op})
        effect.status = EffectStatus.DONE
        effect.result_text = text
        effect.finished_at = now
        effect.token = job.token
        self._log(job, now, Event.EFFECT_RECORDED, worker=lease.worker, detail={"op": ctx.op})
        if then is not None:
            self._move(job, then, now, asked=THEN)
        return json.loads(text)  # type: ignore[no-any-return]

    @_atomic
    def abort_effect(self, ctx: EffectContext) -> None:
        """``fn`` raised: remove the start this attempt recorded, if it is still ours."""
        self._now()
        effect = self._effects.get(ctx.op_key)
        if (
            effect is not None
            and effect.status is EffectStatus.STARTED
            and effect.token == ctx.token
        ):
            del self._effects[ctx.op_key]

    @_atomic
    def finish_effect(
        self, lease: Lease, ctx: EffectContext, result: object, *, then: str | None = None
    ) -> JSON:
        """The second half of ``run_effect``: record ``result``, fenced by the lease, then
        take ``then`` as ``advance`` would. Should ``advance`` refuse it now (``fn`` moved
        the job meanwhile), the result stays recorded and ``IllegalTransition`` is raised,
        exactly as the two calls in a row would do."""
        try:
            text = encode_result(
                result,
                limit=self.config.result_limit,
                depth_limit=self.config.json_depth_limit,
            )
        except EffectResultError:
            now = self._now()
            effect = self._effects.get(ctx.op_key)
            if (
                effect is not None
                and effect.status is EffectStatus.STARTED
                and effect.token == ctx.token
            ):
                effect.status = EffectStatus.IN_DOUBT
                job = self._get(ctx.job_id)
                self._log(
                    job, now, Event.EFFECT_IN_DOUBT, worker=lease.worker, detail={"op": ctx.op}
                )
            raise
        now = self._now()
        job = self._check(lease, now, "run_effect")
        effect = self._effects.get(ctx.op_key)
        if effect is None or effect.status is EffectStatus.DONE:
            # Unreachable while the lease is ours: only our token could have changed it.
            raise LeaseLost(job.job_id, lease.token, job.token, "the effect was taken over")
        effect.status = EffectStatus.DONE
        effect.result_text = text
        effect.finished_at = now
        effect.token = job.token
        self._log(job, now, Event.EFFECT_RECORDED, worker=lease.worker, detail={"op": ctx.op})
        if then is not None:
            self._move(job, then, now, asked=THEN)
        return json.loads(text)  # type: ignore[no-any-return]

    # -- failure and operator actions ------------------------------------------------

    @_atomic
    def fail(
        self, lease: Lease, error: str, *, retryable: bool = True, delay: float | None = None
    ) -> None:
        """Record a failed attempt: eligible again after a backoff while attempts remain,
        else the job enters its workflow's failed state with ``error`` kept."""
        now = self._now()
        check_text(error, name="error")
        seconds = None if delay is None else check_seconds(delay, name="delay")
        job = self._check(lease, now, "fail")
        worker = job.lease_worker
        if retryable and job.attempts < job.max_attempts:
            wait = self.config.backoff(job.attempts) if seconds is None else seconds
            self._end_lease(job)
            job.run_at = now + wait
            job.last_error = error
            job.updated_at = now
            self._log(
                job,
                now,
                Event.FAILED,
                worker=worker,
                detail={"error": error, "retry_at": job.run_at},
            )
            return
        self._enter_failed(job, now, error)
        self._log(job, now, Event.FAILED, worker=worker, detail={"error": error})

    @_atomic
    def cancel(self, job_id: str, reason: str) -> None:
        """Operator: move the job into the failed state, fencing out any lease holder."""
        now = self._now()
        check_text(reason, name="reason")
        job = self._get(job_id)
        flow = self._flow(job.kind)
        if job.state == flow.failed:
            return
        if flow.is_terminal(job.state):
            raise IllegalTransition(
                f"cancel of job {job_id}: it already finished in terminal state "
                f"{job.state!r}; only unfinished jobs can be cancelled"
            )
        job.token += 1
        self._enter_failed(job, now, reason)
        self._log(job, now, Event.CANCELLED, detail={"reason": reason})

    @_atomic
    def retry(self, job_id: str) -> None:
        """Operator: move a failed job back to the state it failed in, attempts reset."""
        now = self._now()
        job = self._get(job_id)
        flow = self._flow(job.kind)
        if job.state != flow.failed:
            raise IllegalTransition(
                f"retry of job {job_id}: it is in state {job.state!r}, not the failed state "
                f"{flow.failed!r}; only failed jobs can be retried"
            )
        back = job.failed_from if job.failed_from is not None else flow.initial
        job.token += 1
        job.state = back
        job.attempts = 0
        job.run_at = now
        job.updated_at = now
        self._log(job, now, Event.RETRIED, detail={"from": flow.failed, "to": back})

    # -- reconcile -----------------------------------------------------------------

    @_atomic
    def reconcile(self, *, dry_run: bool = False) -> ReconcileReport:
        """Expire dead leases, mark their starts in doubt, fail exhausted jobs; one pass."""
        now = self._now()
        if dry_run:
            shadow = MemoryStore(clock=lambda: now, config=self.config)
            shadow._workflows = dict(self._workflows)
            shadow._jobs = copy.deepcopy(self._jobs)
            shadow._effects = copy.deepcopy(self._effects)
            return shadow.reconcile()
        expired = 0
        for job in sorted(self._jobs.values(), key=lambda j: j.seq):
            if job.lease_worker is not None and not job.live(now):
                worker = job.lease_worker
                self._end_lease(job)
                job.updated_at = now
                self._log(job, now, Event.EXPIRED, worker=worker)
                expired += 1
        doubted = 0
        for effect in sorted(self._effects.values(), key=lambda e: e.seq):
            if effect.status is not EffectStatus.STARTED:
                continue
            job = self._jobs[effect.job_id]
            if effect.token != job.token or not job.live(now):
                effect.status = EffectStatus.IN_DOUBT
                self._log(
                    job,
                    now,
                    Event.EFFECT_IN_DOUBT,
                    worker=effect.started_by,
                    detail={"op": effect.op},
                )
                doubted += 1
        failed = 0
        for job in sorted(self._jobs.values(), key=lambda j: j.seq):
            flow = self._flow(job.kind)
            if (
                not flow.is_terminal(job.state)
                and not job.live(now)
                and job.attempts >= job.max_attempts
            ):
                error = exhausted_message(job.attempts, job.max_attempts)
                self._enter_failed(job, now, error)
                self._log(job, now, Event.FAILED, detail={"error": error})
                failed += 1
        return ReconcileReport(leases_expired=expired, effects_in_doubt=doubted, jobs_failed=failed)

    # -- retention -----------------------------------------------------------------

    @_atomic
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
        """Remove terminal jobs that finished before ``finished_before`` (store seconds).

        Jobs go in planned order, ``batch_size`` per batch, each batch atomic: its jobs
        are handed to ``archive`` (if given), then removed with their effects and
        history, leaving a tombstone each unless ``forget_keys``. ``keep_failed`` keeps
        jobs (and tombstones) in their workflow's failed state. ``limit`` caps the jobs
        removed by this call; without a limit, ``forget_keys`` then also removes the
        tombstones of earlier prunes that finished before the cutoff, in batches in key
        order. ``dry_run`` counts and changes nothing. See :mod:`model.retention`.
        """
        now = self._now()
        cutoff = check_cutoff(finished_before)
        size = check_batch_size(batch_size)
        cap = check_limit(limit)

        def kept(kind: str, state: str) -> bool:
            return keep_failed and state == self._flow(kind).failed

        victims = [
            j
            for j in sorted(self._jobs.values(), key=lambda j: j.seq)
            if self._flow(j.kind).is_terminal(j.state)
            and j.updated_at < cutoff
            and not kept(j.kind, j.state)
        ]
        if cap is not None:
            victims = victims[:cap]
        stale = (
            sorted(
                (
                    t
                    for t in self._tombstones.values()
                    if t.finished_at < cutoff and not kept(t.kind, t.state)
                ),
                key=lambda t: t.job_id,
            )
            if forget_keys and cap is None
            else []
        )
        if dry_run:
            effects = sum(
                1 for e in self._effects.values() if e.job_id in {j.job_id for j in victims}
            )
            return PruneReport(
                jobs=len(victims),
                effects=effects,
                tombstones=0 if forget_keys else len(victims),
                forgotten=len(stale),
            )
        report = PruneReport()
        for start in range(0, len(victims), size):
            batch = victims[start : start + size]
            if archive is not None:
                archive([self._pruned(j, now) for j in batch])
            effects = 0
            for job in batch:
                keys = [k for k, e in self._effects.items() if e.job_id == job.job_id]
                for key in keys:
                    del self._effects[key]
                effects += len(keys)
                self._history.pop(job.job_id, None)
                del self._jobs[job.job_id]
                if not forget_keys:
                    self._tombstones[job.job_id] = Tombstone(
                        job_id=job.job_id,
                        kind=job.kind,
                        state=job.state,
                        finished_at=job.updated_at,
                        pruned_at=now,
                    )
            report = report.plus(
                jobs=len(batch), effects=effects, tombstones=0 if forget_keys else len(batch)
            )
            if progress is not None:
                progress(report)
        for start in range(0, len(stale), size):
            chunk = stale[start : start + size]
            for stone in chunk:
                del self._tombstones[stone.job_id]
            report = report.plus(forgotten=len(chunk))
            if progress is not None:
                progress(report)
        return report

    def _pruned(self, job: _Job, now: float) -> PrunedJob:
        effects = sorted(
            (e for e in self._effects.values() if e.job_id == job.job_id), key=lambda e: e.seq
        )
        return PrunedJob(
            job=self._info(job, now),
            effects=tuple(self._effect_info(e) for e in effects),
            history=tuple(self._history.get(job.job_id, [])),
        )

    # -- reads ---------------------------------------------------------------------

    @_atomic
    def state(self, job_id: str) -> str:
        """Return the job's current state."""
        self._now()
        return self._get(job_id).state

    def _info(self, job: _Job, now: float) -> JobInfo:
        return JobInfo(
            job_id=job.job_id,
            kind=job.kind,
            identity=dict(job.identity),
            payload=json.loads(job.payload_text),
            state=job.state,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            priority=job.priority,
            run_at=job.run_at,
            token=job.token,
            lease=self._lease_of(job) if job.live(now) else None,
            last_error=job.last_error,
            created_at=job.created_at,
            updated_at=job.updated_at,
            failed_from=job.failed_from,
            lease_worker=job.lease_worker,
            lease_expires_at=job.lease_expires_at,
        )

    @_atomic
    def job(self, job_id: str) -> JobInfo:
        """Return a snapshot of the job."""
        now = self._now()
        return self._info(self._get(job_id), now)

    @_atomic
    def jobs(
        self,
        *,
        state: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[JobInfo]:
        """List jobs in planned order (or newest first), filtered by state and kind."""
        now = self._now()
        if limit is not None:
            check_int(limit, name="limit", minimum=0)
        rows = sorted(self._jobs.values(), key=lambda j: j.seq, reverse=newest_first)
        out = [
            self._info(j, now)
            for j in rows
            if (state is None or j.state == state) and (kind is None or j.kind == kind)
        ]
        return out if limit is None else out[:limit]

    @_atomic
    def leases(self) -> list[LeaseRow]:
        """List leases that are set (live, or expired and not yet reconciled)."""
        now = self._now()
        rows = [
            LeaseRow(
                job_id=j.job_id,
                kind=j.kind,
                state=j.state,
                worker=j.lease_worker,
                token=j.token,
                expires_at=j.lease_expires_at,
                live=j.live(now),
            )
            for j in self._jobs.values()
            if j.lease_worker is not None and j.lease_expires_at is not None
        ]
        return sorted(rows, key=lambda r: (r.expires_at, r.job_id))

    @_atomic
    def effects(self, job_id: str) -> list[EffectInfo]:
        """List the job's effects in the order they were first started."""
        self._now()
        self._get(job_id)
        rows = sorted(
            (e for e in self._effects.values() if e.job_id == job_id), key=lambda e: e.seq
        )
        return [self._effect_info(e) for e in rows]

    @staticmethod
    def _effect_info(e: _Effect) -> EffectInfo:
        return EffectInfo(
            job_id=e.job_id,
            op=e.op,
            op_key=e.op_key,
            status=e.status,
            result=None if e.result_text is None else json.loads(e.result_text),
            started_at=e.started_at,
            finished_at=e.finished_at,
            token=e.token,
            started_by=e.started_by,
            extras=dict(e.extras),
        )

    @_atomic
    def history(self, job_id: str) -> list[HistoryEvent]:
        """Return the job's history, oldest first."""
        self._now()
        self._get(job_id)
        return list(self._history.get(job_id, []))

    @_atomic
    def stats(self) -> Stats:
        """Counts by kind and state, leases, in-doubt effects, failures and queue lag."""
        now = self._now()
        by_state: dict[str, dict[str, int]] = {
            name: dict.fromkeys(flow.states, 0) for name, flow in self._workflows.items()
        }
        live = expired = failed = 0
        oldest: float | None = None
        for job in self._jobs.values():
            flow = self._flow(job.kind)
            by_state[job.kind][job.state] += 1
            if job.lease_worker is not None:
                if job.live(now):
                    live += 1
                else:
                    expired += 1
            if job.state == flow.failed:
                failed += 1
            eligible = (
                not flow.is_terminal(job.state)
                and not job.live(now)
                and job.run_at <= now
                and job.attempts < job.max_attempts
            )
            if eligible and (oldest is None or job.run_at < oldest):
                oldest = job.run_at
        in_doubt = 0
        for effect in self._effects.values():
            job = self._jobs[effect.job_id]
            if effect.status is EffectStatus.IN_DOUBT or (
                effect.status is EffectStatus.STARTED
                and (effect.token != job.token or not job.live(now))
            ):
                in_doubt += 1
        return Stats(
            by_state=by_state,
            leases_live=live,
            leases_expired=expired,
            in_doubt=in_doubt,
            failed=failed,
            oldest_eligible_age=None if oldest is None else now - oldest,
        )

    # -- breakers ----------------------------------------------------------------------

    @_atomic
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
        now = self._now()
        key = (change.host, change.worker)
        before = self._breakers.get(key)
        if change.state is BreakerMove.OPEN:
            assert change.cooldown is not None
            row = BreakerRow(
                host=change.host,
                worker=change.worker,
                state=BreakerMove.OPEN,
                failures=change.failures,
                last_error=change.last_error,
                opened_at=now,
                until=now + change.cooldown,
                changed_at=now,
                opens=(before.opens if before is not None else 0) + 1,
            )
        else:
            row = BreakerRow(
                host=change.host,
                worker=change.worker,
                state=BreakerMove.CLOSED,
                failures=change.failures,
                last_error=(
                    change.last_error
                    if change.last_error is not None or before is None
                    else before.last_error
                ),
                opened_at=before.opened_at if before is not None else None,
                until=None,
                changed_at=now,
                opens=before.opens if before is not None else 0,
            )
        self._breakers[key] = row

    @_atomic
    def breakers(self) -> list[BreakerRow]:
        """Every recorded breaker row, by host then worker."""
        self._now()
        return [self._breakers[key] for key in sorted(self._breakers)]

    @_atomic
    def forget_breakers(self, *, changed_before: float) -> int:
        """Remove the rows last changed before ``changed_before``; return how many."""
        cutoff = check_before(changed_before)
        self._now()
        gone = [key for key, row in self._breakers.items() if row.changed_at < cutoff]
        for key in gone:
            del self._breakers[key]
        return len(gone)
