"""The stateful agreement machine: the model and a real store driven side by side.

Every rule applies one operation to the reference model and (when a subject backend is
given) to the real store through the handle of the logical worker that makes the call,
compares results and raised error types, and then checks the contract's invariants and
that the two projections are equal. Crash rules arm a failpoint, let the real store die
there, reopen it from disk, and tell the model what the crash left behind: a change is
durable exactly when the crash came after its commit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from impl import failpoint
from model import (
    Config,
    EffectContext,
    EffectStatus,
    Event,
    JobledgerError,
    JobPruned,
    Lease,
    ManualClock,
    MemoryStore,
    OnDoubt,
    PrunedJob,
    PruneReport,
    ReconcileReport,
    Store,
    Workflow,
    job_key,
)
from model.validate import check_text
from tests.values import COMPACT, error_texts, payloads, results, typed

FLOW = Workflow(
    name="flow",
    states=["A", "B", "C", "D", "FAILED"],
    transitions=[("A", "B"), ("B", "C"), ("A", "D"), ("B", "D")],
    initial="A",
    terminal=["C", "D"],
)
TTL = 3.0
WORKERS = ("w0", "w1", "w2")
STATES = ("A", "B", "C", "D", "FAILED", "Z")
OPS = ("e1", "e2")
TICKS = (0.0, 1.0, TTL - 1, TTL, TTL + 1, 100.0)
MAX_ATTEMPTS = 3
# Small limits, so the values drawn from tests/values.py reach them (one byte or one
# level under, at and over) and the comparison covers refused values after crashes too.
RESULT_LIMIT = 256
DEPTH_LIMIT = 6
PAYLOADS = st.one_of(
    st.sampled_from([None, {"p": 1}]), payloads(depth_limit=DEPTH_LIMIT, sizes=COMPACT)
)

# (operation, failpoint) pairs a crash rule can pick, and whether the model should apply
# the operation: True after the commit, False before it. For effects, "start" means the
# start is durable but no result, "full" means the result is durable too.
CRASHES: tuple[tuple[str, str, str], ...] = (
    ("plan", "plan.before_commit", "none"),
    ("plan", "plan.after_commit", "full"),
    ("lease_next", "lease_next.before_commit", "none"),
    ("lease_next", "lease_next.after_commit", "full"),
    ("advance", "advance.before_tx", "none"),
    ("advance", "advance.before_commit", "none"),
    ("advance", "advance.after_commit", "full"),
    ("fail", "fail.before_commit", "none"),
    ("fail", "fail.after_commit", "full"),
    ("release", "release.after_commit", "full"),
    ("renew", "renew.after_commit", "full"),
    ("reconcile", "reconcile.before_commit", "none"),
    ("reconcile", "reconcile.after_commit", "full"),
    ("effect", "effect_start.before_commit", "none"),
    ("effect", "effect.after_start", "start"),
    ("effect", "effect.before_record", "start"),
    ("effect", "effect_record.before_commit", "start"),
    ("effect", "effect.after_record", "full"),
    # run_effect(then="B"): the result transaction carries the advance.
    ("effect_then", "effect_record.before_commit", "start"),
    ("effect_then", "effect_record.after_commit", "full"),
    ("effect_then", "effect.after_record", "full"),
)
THENS = (None, None, None, "A", "B", "C", "D", "FAILED", "Z")
"""``then`` of a ``run_effect`` rule: mostly none, else every state, legal or not."""

# Where a prune can die: each batch passes these, in this order.
PRUNE_POINTS = (
    "prune.before_tx",
    "prune.after_archive",
    "prune.before_commit",
    "prune.after_commit",
)
# How long ago a job must have finished; a negative age puts the cutoff in the future
# (every finished job goes), so prunes and crashes in them are frequent.
PRUNE_AGES = (-1000.0, -1000.0, 0.0, 1.0, TTL, 100.0)

FREE_OPERATIONS = ("plan", "lease_next", "reconcile")
FREE_CRASHES = tuple(c for c in CRASHES if c[0] in FREE_OPERATIONS)
_NO_LEASE = Lease(
    job_id="", kind="", token=0, worker="", expires_at=0.0, attempt=0, state="", identity={}
)

Outcome = tuple[str, object]


def outcome(call: Callable[[], object]) -> Outcome:
    """Run ``call`` and return ("ok", value) or ("err", error type name)."""
    try:
        return ("ok", call())
    except JobledgerError as exc:
        return ("err", type(exc).__name__)


def lease_view(value: object) -> object:
    """The comparable part of a returned value (leases compare without identity order),
    exact as :func:`tests.values.typed` makes it (``1.0`` is not ``1``)."""
    if isinstance(value, Lease):
        return (
            value.job_id,
            value.kind,
            value.token,
            value.worker,
            value.expires_at,
            value.attempt,
            value.state,
            typed(value.identity, ordered=False),
            typed(value.payload),
        )
    return typed(value)


def projection(store: Store, job_ids: list[str]) -> dict[str, Any]:
    """Everything a backend must agree on: jobs, effects and history, by job, and the
    operator's views (stats, leases, a reconcile dry run) of them all."""
    out: dict[str, Any] = {
        "stats": store.stats(),
        "leases": store.leases(),
        "reconcile": store.reconcile(dry_run=True),
    }
    for jid in job_ids:
        try:
            info = store.job(jid)
        except JobledgerError:
            out[jid] = None
            continue
        out[jid] = {
            "job": (
                info.kind,
                typed(info.identity, ordered=False),
                typed(info.payload),
                info.state,
                info.attempts,
                info.max_attempts,
                info.priority,
                info.run_at,
                info.token,
                info.lease_worker,
                info.lease_expires_at,
                info.last_error,
                info.failed_from,
                info.created_at,
                info.updated_at,
            ),
            "effects": [
                (
                    e.op,
                    e.op_key,
                    str(e.status),
                    typed(e.result),
                    e.started_at,
                    e.finished_at,
                    e.token,
                    e.started_by,
                )
                for e in store.effects(jid)
            ],
            "history": [
                (str(h.event), h.at, h.token, h.worker, typed(h.detail, ordered=False))
                for h in store.history(jid)
            ],
        }
    return out


class LedgerMachine(RuleBasedStateMachine):
    """Drives the model (and a subject backend, in subclasses) through random steps.

    Besides comparing with the subject, the machine keeps its own small oracle of which
    grant is live for each job (token and expiry, from what the calls returned), so the
    model alone is also checked: a call with a lease the oracle says is dead must raise
    ``LeaseLost``, and one it says is live must not.
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.model = MemoryStore(clock=self.clock, config=self.config())
        self.job_ids: list[str] = []
        self.leases: dict[str, Lease | None] = dict.fromkeys(WORKERS)
        self.stale: list[Lease] = []
        self.grant: dict[str, tuple[int, float] | None] = {}
        self.recorded: dict[str, object] = {}
        self.max_token: dict[str, int] = {}
        self.fn_calls: list[str] = []
        self.gone: set[str] = set()

    # -- subject hooks (the model-only machine has no subject) ---------------------

    def config(self) -> Config:
        return Config(
            lease_ttl=TTL,
            max_attempts=MAX_ATTEMPTS,
            result_limit=RESULT_LIMIT,
            json_depth_limit=DEPTH_LIMIT,
        )

    def subject(self, worker: str) -> Store | None:
        """The real store handle of ``worker`` (or of the operator, "op"), if any."""
        return None

    def reopen(self) -> None:
        """Reopen every real handle from disk after a crash."""

    def supports_crash(self) -> bool:
        """True when the subject has failpoints to crash at."""
        return False

    # -- plumbing ----------------------------------------------------------------

    def both(self, worker: str, call: Callable[[Store], object]) -> Outcome:
        """Apply an operation to the model and the subject; they must agree."""
        expected = outcome(lambda: call(self.model))
        shown = type(expected[1]).__name__ if expected[0] == "ok" else expected[1]
        event(f"outcome {expected[0]} {shown}")
        real = self.subject(worker)
        if real is not None:
            got = outcome(lambda: call(real))
            assert (expected[0], lease_view(expected[1])) == (got[0], lease_view(got[1])), (
                f"model {expected} != subject {got}"
            )
        return expected

    def live(self, lease: Lease) -> bool:
        """The oracle: is ``lease`` the job's live grant right now?"""
        grant = self.grant.get(lease.job_id)
        return grant is not None and grant[0] == lease.token and self.clock() < grant[1]

    def resync(self) -> None:
        """Refresh the oracle from the model after operations that end grants."""
        for jid in self.job_ids:
            info = self.model.job(jid)
            grant = self.grant.get(jid)
            if grant is not None and (info.token != grant[0] or info.lease_worker is None):
                self.grant[jid] = None

    def with_lease(
        self, worker: str, call: Callable[[Store, Lease], object], *, invalid: bool = False
    ) -> Outcome | None:
        """Run a lease-taking call for ``worker``; check it against the oracle.

        ``invalid``: an argument is refused (checked before the lease), live or not."""
        lease = self.leases[worker]
        if lease is None:
            return None
        was_live = self.live(lease)
        out = self.both(worker, lambda s: call(s, lease))
        if invalid:
            assert out == ("err", "InvalidInput"), f"an invalid argument was accepted: {out}"
        elif not was_live:
            assert out == ("err", "LeaseLost"), f"a dead lease was accepted: {out}"
        else:
            assert out != ("err", "LeaseLost"), "a live lease was refused"
        if isinstance(out[1], Lease):
            self.grant[lease.job_id] = (out[1].token, out[1].expires_at)
        self.resync()
        return out

    def effect_fn(
        self, op: str, mode: str, ledger: list[str] | None, store: Store, value: object = None
    ) -> Callable[[EffectContext], object]:
        def fn(ctx: EffectContext) -> object:
            if ledger is not None:
                done = {e.op_key for e in store.effects(ctx.job_id) if e.status == "done"}
                assert ctx.op_key not in done, f"fn called for recorded op key {ctx.op_key}"
                ledger.append(ctx.op_key)
            if mode == "raise":
                raise RuntimeError("effect failed")
            if mode == "nonjson":
                return {"bad": float("nan")}
            if mode == "value":
                return value
            return {"op": op, "token": ctx.token, "attempt": ctx.attempt}

        return fn

    # -- rules -------------------------------------------------------------------

    @initialize()
    def setup(self) -> None:
        self.both("op", lambda s: s.register(FLOW))

    @rule(n=st.integers(0, 3), payload=PAYLOADS, prio=st.integers(0, 1))
    def plan(self, n: int, payload: object, prio: int) -> None:
        out = self.both("op", lambda s: s.plan("flow", {"n": n}, payload=payload, priority=prio))
        jid = out[1]
        if out[0] == "ok" and isinstance(jid, str) and self.new_job(jid):
            assert jid == job_key("flow", {"n": n})
            self.job_ids.append(jid)

    @rule(ns=st.lists(st.integers(0, 5), min_size=1, max_size=3))
    def plan_many(self, ns: list[int]) -> None:
        out = self.both("op", lambda s: s.plan_many("flow", [{"n": n} for n in ns]))
        if out[0] == "ok" and isinstance(out[1], list):
            for jid in out[1]:
                if self.new_job(jid):
                    self.job_ids.append(jid)

    @rule(worker=st.sampled_from(WORKERS), ttl=st.sampled_from([None, 1.0, TTL, 5.0]))
    def lease_next(self, worker: str, ttl: float | None) -> None:
        before = {jid: self.model.state(jid) for jid in self.job_ids}
        out = self.both(worker, lambda s: s.lease_next(worker, ttl=ttl))
        self.resync()
        lease = out[1]
        if isinstance(lease, Lease):
            assert not FLOW.is_terminal(before[lease.job_id]), "a terminal job was leased"
            grant = self.grant.get(lease.job_id)
            assert grant is None or self.clock() >= grant[1], "two live leases on one job"
            self.grant[lease.job_id] = (lease.token, lease.expires_at)
            old = self.leases[worker]
            if old is not None:
                self.stale.append(old)
            self.leases[worker] = lease

    @rule(worker=st.sampled_from(WORKERS), ttl=st.sampled_from([None, 1.0, 5.0]))
    def renew(self, worker: str, ttl: float | None) -> None:
        self.with_lease(worker, lambda s, lease: s.renew(lease, ttl=ttl))

    @rule(worker=st.sampled_from(WORKERS), delay=st.sampled_from([0.0, 2.0]))
    def release(self, worker: str, delay: float) -> None:
        self.with_lease(worker, lambda s, lease: s.release(lease, delay=delay))

    @rule(worker=st.sampled_from(WORKERS), to=st.sampled_from(STATES))
    def advance(self, worker: str, to: str) -> None:
        self.with_lease(worker, lambda s, lease: s.advance(lease, to))

    @rule(
        worker=st.sampled_from(WORKERS),
        op=st.sampled_from(OPS),
        mode=st.sampled_from(["ok", "ok", "raise", "nonjson", "value", "value"]),
        doubt=st.sampled_from(["retry", "raise", "probe_value", "probe_none"]),
        value=results(limit=RESULT_LIMIT, depth_limit=DEPTH_LIMIT, sizes=COMPACT),
        then=st.sampled_from(THENS),
    )
    def run_effect(
        self, worker: str, op: str, mode: str, doubt: str, value: object, then: str | None
    ) -> None:
        def policy() -> OnDoubt:
            if doubt == "probe_value":
                return lambda info: {"probed": info.op, "token": info.started_token}
            if doubt == "probe_none":
                return lambda info: None
            return "retry" if doubt == "retry" else "raise"

        # The ledger of fn calls is kept for the store whose fn "really" runs: the
        # subject when there is one, else the model.
        real = self.subject(worker) is not None

        def call(store: Store, lease: Lease) -> object:
            ledger = self.fn_calls if (store is not self.model) == real else None
            try:
                return store.run_effect(
                    lease,
                    op,
                    self.effect_fn(op, mode, ledger, store, value),
                    on_doubt=policy(),
                    then=then,
                )
            except RuntimeError:
                return "fn raised"

        self.with_lease(worker, call)

    @rule(
        worker=st.sampled_from(WORKERS),
        retryable=st.booleans(),
        delay=st.sampled_from([None, 0.0, 2.0]),
        error=error_texts(sizes=COMPACT),
    )
    def fail(self, worker: str, retryable: bool, delay: float | None, error: str) -> None:
        self.with_lease(
            worker,
            lambda s, lease: s.fail(lease, error, retryable=retryable, delay=delay),
            invalid=outcome(lambda: check_text(error, name="error"))[0] == "err",
        )

    @precondition(lambda self: self.job_ids)
    @rule(data=st.data(), reason=error_texts(sizes=COMPACT))
    def cancel(self, data: st.DataObject, reason: str) -> None:
        jid = data.draw(st.sampled_from(self.job_ids))
        self.both("op", lambda s: s.cancel(jid, reason))
        self.resync()

    @precondition(lambda self: self.job_ids)
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        jid = data.draw(st.sampled_from(self.job_ids))
        self.both("op", lambda s: s.retry(jid))
        self.resync()

    @rule(dry=st.booleans())
    def reconcile(self, dry: bool) -> None:
        before = projection(self.model, self.job_ids)
        out = self.both("op", lambda s: s.reconcile(dry_run=dry))
        if dry:
            assert projection(self.model, self.job_ids) == before, "a dry run changed state"
        else:
            again = self.both("op", lambda s: s.reconcile())
            assert again == ("ok", ReconcileReport()), f"reconcile not idempotent: {again}"
        assert out[0] == "ok"
        self.resync()

    @rule(dt=st.sampled_from(TICKS))
    def tick(self, dt: float) -> None:
        self.clock.advance(dt)

    @precondition(lambda self: self.stale)
    @rule(data=st.data(), what=st.sampled_from(["advance", "renew", "fail", "release", "effect"]))
    def stale_lease_changes_nothing(self, data: st.DataObject, what: str) -> None:
        lease = data.draw(st.sampled_from(self.stale))
        if self.live(lease):
            return  # the same grant is still live: not stale

        def act(store: Store) -> object:
            if what == "advance":
                return store.advance(lease, "B")
            if what == "renew":
                return store.renew(lease)
            if what == "fail":
                return store.fail(lease, "late")
            if what == "release":
                return store.release(lease)
            return store.run_effect(lease, "late", lambda ctx: 1)

        before = projection(self.model, self.job_ids)
        real = self.subject("op")
        sbefore = projection(real, self.job_ids) if real is not None else None
        assert self.both("op", act) == ("err", "LeaseLost")
        assert projection(self.model, self.job_ids) == before
        if real is not None:
            assert projection(real, self.job_ids) == sbefore

    @precondition(lambda self: any(self.leases.values()))
    @rule(worker=st.sampled_from(WORKERS), crash=st.sampled_from(CRASHES), op=st.sampled_from(OPS))
    def crash_worker(self, worker: str, crash: tuple[str, str, str], op: str) -> None:
        """The worker's process dies in a call, at a failpoint when the subject has them."""
        self._crash(worker, crash, op)

    @rule(worker=st.sampled_from(WORKERS), crash=st.sampled_from(FREE_CRASHES))
    def crash_without_lease(self, worker: str, crash: tuple[str, str, str]) -> None:
        """The same, in the calls that need no lease (so crashes stay frequent)."""
        self._crash(worker, crash, OPS[0])

    def _crash(self, worker: str, crash: tuple[str, str, str], op: str) -> None:
        operation, point, survives = crash
        held = self.leases[worker]
        if held is None and operation not in FREE_OPERATIONS:
            return
        # Calls that need no lease ignore it; a placeholder keeps one signature.
        lease = held if held is not None else _NO_LEASE
        m = self.model
        real = self.subject(worker)
        then = "B" if operation == "effect_then" else None
        if real is None or not self.supports_crash():
            # The model alone: a dead worker just stops calling; an effect it had
            # started stays started until its lease is dead (then it is in doubt).
            if operation.startswith("effect") and survives == "start":
                outcome(lambda: m.begin_effect(lease, op, then=then))
        else:
            failpoint.arm(point)
            try:
                got: Outcome | None = outcome(
                    lambda: self._call(operation, real, lease, worker, op, self.fn_calls)
                )
            except failpoint.Crash:
                got = None
            finally:
                failpoint.disarm_all()
            event(f"crash {point}: {'died' if got is None else 'not reached'}")
            if got is None:
                # The subject died at the failpoint: the model keeps exactly what was
                # committed before it.
                if survives == "start":
                    started = outcome(lambda: m.begin_effect(lease, op, then=then))
                    assert started[0] == "ok", f"crashed after a start the model refused: {started}"
                elif survives == "full":
                    done = outcome(lambda: self._call(operation, m, lease, worker, op, None))
                    assert done[0] == "ok", f"subject committed what the model refused: {done}"
            else:
                # The failpoint was not reached (a refused call, a replay, nothing to do):
                # the call completed and must agree with the model's.
                expected = outcome(lambda: self._call(operation, m, lease, worker, op, None))
                assert (expected[0], lease_view(expected[1])) == (got[0], lease_view(got[1]))
            self.reopen()
        self.leases[worker] = None
        if held is not None:
            self.stale.append(held)
        # A crash after plan's commit planned a job the machine did not see returned.
        known = {j.job_id for j in m.jobs()}
        self.job_ids.extend(j for j in sorted(known) if j not in self.job_ids)
        for info in m.jobs():
            if info.lease is not None:
                self.grant[info.job_id] = (info.lease.token, info.lease.expires_at)
        self.resync()

    def _call(
        self,
        operation: str,
        store: Store,
        lease: Lease,
        worker: str,
        op: str,
        ledger: list[str] | None,
    ) -> object:
        if operation == "plan":
            return store.plan("flow", {"n": 9})
        if operation == "lease_next":
            return store.lease_next(worker)
        if operation == "advance":
            return store.advance(lease, "B")
        if operation == "fail":
            return store.fail(lease, "crashing")
        if operation == "release":
            return store.release(lease)
        if operation == "renew":
            return store.renew(lease)
        if operation == "reconcile":
            return store.reconcile()
        then = "B" if operation == "effect_then" else None
        return store.run_effect(lease, op, self.effect_fn(op, "ok", ledger, store), then=then)

    # -- retention -----------------------------------------------------------------

    @rule(
        age=st.sampled_from(PRUNE_AGES),
        keep_failed=st.booleans(),
        forget=st.booleans(),
        batch=st.sampled_from([1, 2, 500]),
        limit=st.sampled_from([None, None, 1, 3]),
        dry=st.booleans(),
    )
    def prune(
        self, age: float, keep_failed: bool, forget: bool, batch: int, limit: int | None, dry: bool
    ) -> None:
        """Prune finished jobs; model and subject remove (and archive) the same ones."""
        cutoff = self.clock() - age
        archives: dict[int, list[PrunedJob]] = {}
        before = self.effect_keys()

        def call(store: Store) -> object:
            kept = archives.setdefault(id(store), [])
            return store.prune(
                finished_before=cutoff,
                keep_failed=keep_failed,
                forget_keys=forget,
                dry_run=dry,
                batch_size=batch,
                limit=limit,
                archive=kept.extend,
            )

        out = self.both("op", call)
        assert out[0] == "ok", out
        assert isinstance(out[1], PruneReport)
        event(f"prune {'counted' if dry else 'removed'} {min(out[1].jobs, 3)}+ jobs")
        shown = list(archives.values())
        assert all(a == shown[0] for a in shown), "model and subject archived differently"
        if dry:
            assert shown[0] == []
        self.after_prune(before)

    @rule(
        point=st.sampled_from(PRUNE_POINTS),
        hit=st.integers(1, 2),
        batch=st.sampled_from([1, 2]),
        age=st.sampled_from((-1000.0, -1000.0, 0.0)),
    )
    @precondition(lambda self: any(FLOW.is_terminal(self.model.state(j)) for j in self.job_ids))
    def crash_in_prune(self, point: str, hit: int, batch: int, age: float) -> None:
        """The operator's prune dies in its ``hit``-th batch at ``point``: the batches
        before are removed, that batch only if the crash came after its commit."""
        real = self.subject("op")
        if real is None or not self.supports_crash():
            return
        cutoff = self.clock() - age
        before = self.effect_keys()
        failpoint.arm(point, on_hit=hit)
        try:
            got: Outcome | None = outcome(
                lambda: real.prune(
                    finished_before=cutoff, batch_size=batch, archive=lambda jobs: None
                )
            )
        except failpoint.Crash:
            got = None
        finally:
            failpoint.disarm_all()
        event(f"crash {point} at batch {hit}: {'died' if got is None else 'not reached'}")
        if got is None:
            done = hit if point == "prune.after_commit" else hit - 1
            self.model.prune(finished_before=cutoff, batch_size=batch, limit=done * batch)
        else:
            expected = outcome(lambda: self.model.prune(finished_before=cutoff, batch_size=batch))
            assert expected == got, f"model {expected} != subject {got}"
        self.reopen()
        self.after_prune(before)

    def new_job(self, jid: str) -> bool:
        """Whether ``jid``, just planned, is a job the machine does not follow yet (a
        pruned job's key planned again is not, unless the key was forgotten)."""
        if jid in self.job_ids:
            return False
        return jid not in self.gone or outcome(lambda: self.model.job(jid))[0] == "ok"

    def effect_keys(self) -> dict[str, list[str]]:
        """The op keys of every known job's effects (a prune removes them)."""
        return {j: [e.op_key for e in self.model.effects(j)] for j in self.job_ids}

    def after_prune(self, effect_keys: dict[str, list[str]]) -> None:
        """Move pruned jobs from ``job_ids`` to ``gone``; forget what the oracle kept of
        them (a forgotten key planned again is a new job: new tokens, new results) and
        the leases of forgotten keys (their workers must be long gone, model.retention)."""
        for jid in list(self.job_ids):
            try:
                self.model.job(jid)
                continue
            except JobPruned:
                forgotten = False
            except JobledgerError:
                forgotten = True
            self.job_ids.remove(jid)
            self.gone.add(jid)
            self.max_token.pop(jid, None)
            self.grant.pop(jid, None)
            for key in effect_keys.get(jid, []):
                self.recorded.pop(key, None)
            if forgotten:
                for worker, lease in self.leases.items():
                    if lease is not None and lease.job_id == jid:
                        self.leases[worker] = None
                self.stale = [lease for lease in self.stale if lease.job_id != jid]
        for jid in list(self.gone):
            if jid not in self.job_ids:
                try:
                    self.model.job(jid)
                except JobPruned:
                    continue
                except JobledgerError:
                    for worker, lease in self.leases.items():
                        if lease is not None and lease.job_id == jid:
                            self.leases[worker] = None
                    self.stale = [lease for lease in self.stale if lease.job_id != jid]

    @invariant()
    def pruned_jobs_read_as_pruned(self) -> None:
        """A pruned job reads as pruned (or, its key forgotten, unknown) on both sides."""
        real = self.subject("op")
        for jid in sorted(self.gone - set(self.job_ids)):
            expected = outcome(lambda jid=jid: self.model.job(jid))  # type: ignore[misc]
            assert expected[0] == "err"
            assert expected[1] in ("JobPruned", "UnknownJob")
            if real is not None:
                got = outcome(lambda jid=jid: real.job(jid))  # type: ignore[misc]
                assert got == expected, f"model {expected} != subject {got}"

    # -- invariants ----------------------------------------------------------------

    @invariant()
    def agree_and_hold(self) -> None:
        model_view = projection(self.model, self.job_ids)
        real = self.subject("op")
        if real is not None:
            assert projection(real, self.job_ids) == model_view
        for jid in self.job_ids:
            info = self.model.job(jid)
            assert info.attempts <= info.max_attempts, "attempts exceed max_attempts"
            assert info.token >= self.max_token.get(jid, 0), "token went down"
            self.max_token[jid] = info.token
            visited = [FLOW.initial]
            granted: list[int] = []
            for h in self.model.history(jid):
                if h.event is Event.ADVANCED:
                    src, dst = h.detail["from"], h.detail["to"]
                    assert (src, dst) in FLOW.transitions, f"undeclared edge {src}->{dst}"
                    assert dst not in visited, f"state {dst} repeated"
                    visited.append(str(dst))
                elif h.event is Event.RETRIED:
                    visited = [str(h.detail["to"])]
                elif h.event is Event.LEASED:
                    assert not granted or h.token > granted[-1], "tokens not increasing"
                    granted.append(h.token)
            for e in self.model.effects(jid):
                if e.status is EffectStatus.DONE:
                    first = self.recorded.setdefault(e.op_key, typed(e.result))
                    assert first == typed(e.result), "a recorded result changed"

    def teardown(self) -> None:
        """Liveness: with a live worker and an advancing clock every job ends, on the
        model and the subject alike, and they still agree afterwards."""
        failpoint.disarm_all()
        self.clock.advance(1000.0)
        self.both("op", lambda s: s.reconcile())
        # Each job needs at most max_attempts + a few leases, so a store that keeps
        # handing out work forever fails here instead of hanging.
        for _ in range(len(self.job_ids) * (MAX_ATTEMPTS + 4) + 1):
            lease = self.both("op", lambda s: s.lease_next("drainer"))
            if not isinstance(lease, Lease):
                if all(FLOW.is_terminal(self.model.state(j)) for j in self.job_ids):
                    break
                self.clock.advance(1000.0)
                continue
            state = lease.state
            while not FLOW.is_terminal(state):
                state = sorted(FLOW.successors()[state])[0]
                self.both("op", lambda s, to=state, held=lease: s.advance(held, to))
        for jid in self.job_ids:
            assert FLOW.is_terminal(self.model.state(jid)), f"job {jid} never finished"
        self.agree_and_hold()
