"""Reconcile: the crash-recovery pass that expires dead leases, marks their starts in doubt
and fails jobs with no attempts left, in that order, idempotently."""

from __future__ import annotations

import pytest

import impl
from model import EffectContext, EffectStatus, Event, ManualClock, ReconcileReport, Store

from .flows import expire, setup, snapshot


def _crash_scene(store: Store, clock: ManualClock) -> dict[str, str]:
    """Four jobs after a crash of worker w1, and one live job of worker w2.

    - ``effect``: leased by w1, started an effect, then w1 died (lease expires).
    - ``exhausted``: max_attempts=1, leased by w1, w1 died.
    - ``quiet``: leased by w1, advanced to A, w1 died.
    - ``live``: leased by w2 later, effect started and still running (live lease).
    - ``idle``: planned, never leased.
    """
    setup(store)
    ids = {
        "effect": store.plan("linear", {"n": "effect"}, priority=4),
        "exhausted": store.plan("linear", {"n": "exhausted"}, max_attempts=1, priority=3),
        "quiet": store.plan("linear", {"n": "quiet"}, priority=2),
        "idle": store.plan("linear", {"n": "idle"}),
    }
    effect_lease = store.lease_next("w1", ttl=10)
    exhausted_lease = store.lease_next("w1", ttl=10)
    quiet_lease = store.lease_next("w1", ttl=10)
    assert effect_lease is not None
    assert exhausted_lease is not None
    assert quiet_lease is not None
    assert [effect_lease.job_id, exhausted_lease.job_id, quiet_lease.job_id] == [
        ids["effect"],
        ids["exhausted"],
        ids["quiet"],
    ]
    store.advance(quiet_lease, "A")

    def dies(ctx: EffectContext) -> object:
        expire(clock, effect_lease)  # w1 stalls past its lease: its start is left behind
        return "late"

    with pytest.raises(impl.LeaseLost):
        store.run_effect(effect_lease, "PUSH", dies)
    # Planned after the crash and first in line, so w2 takes it rather than a dead job.
    ids["live"] = store.plan("linear", {"n": "live"}, priority=10)
    live_lease = store.lease_next("w2", ttl=100)
    assert live_lease is not None
    assert live_lease.job_id == ids["live"]
    # The live worker's effect is mid-flight: its start is recorded, its fn not yet done.
    store.run_effect(live_lease, "DONE-LATER", lambda ctx: "x")
    store.run_effect(live_lease, "SLOW", _start_only(store, live_lease.job_id))
    return ids


def _start_only(store: Store, job_id: str) -> object:
    def fn(ctx: EffectContext) -> object:
        statuses = [e.status for e in store.effects(job_id) if e.op == "SLOW"]
        assert statuses == [EffectStatus.STARTED]
        # Reconcile beside a running worker must not touch this start.
        report = store.reconcile(dry_run=True)
        assert report == ReconcileReport(leases_expired=3, effects_in_doubt=1, jobs_failed=1)
        return "slow"

    return fn


def test_first_pass_counts_and_effects(store: Store, clock: ManualClock) -> None:
    ids = _crash_scene(store, clock)
    before = {name: store.job(jid) for name, jid in ids.items()}
    clock.advance(1)
    report = store.reconcile()
    assert report == ReconcileReport(leases_expired=3, effects_in_doubt=1, jobs_failed=1)
    after = {name: store.job(jid) for name, jid in ids.items()}
    # Expired leases are cleared; attempts and run_at stay as they were.
    for name in ("effect", "exhausted", "quiet"):
        assert (after[name].lease_worker, after[name].lease_expires_at) == (None, None)
        assert after[name].attempts == before[name].attempts == 1
        assert after[name].run_at == before[name].run_at
        assert after[name].token == before[name].token == 1
    assert [after[n].state for n in ("effect", "exhausted", "quiet", "live", "idle")] == [
        "NEW",
        "FAILED",
        "A",
        "NEW",
        "NEW",
    ]
    assert after["exhausted"].failed_from == "NEW"
    assert after["exhausted"].last_error
    # The live job and the idle job are untouched.
    assert after["live"] == before["live"]
    assert after["idle"] == before["idle"]
    assert [(e.op, e.status) for e in store.effects(ids["effect"])] == [
        ("PUSH", EffectStatus.IN_DOUBT),
    ]
    assert [(e.op, e.status) for e in store.effects(ids["live"])] == [
        ("DONE-LATER", EffectStatus.DONE),
        ("SLOW", EffectStatus.DONE),
    ]


def test_pass_order_is_expire_then_doubt_then_fail(store: Store, clock: ManualClock) -> None:
    ids = _crash_scene(store, clock)
    marks = {name: len(store.history(jid)) for name, jid in ids.items()}
    store.reconcile()
    new = {name: store.history(jid)[marks[name] :] for name, jid in ids.items()}
    assert [str(e.event) for e in new["effect"]] == ["expired", "effect_in_doubt"]
    assert [str(e.event) for e in new["exhausted"]] == ["expired", "failed"]
    assert [str(e.event) for e in new["quiet"]] == ["expired"]
    assert new["live"] == []
    assert new["idle"] == []
    expired = new["effect"][0]
    assert (expired.token, expired.worker) == (1, "w1")
    assert dict(new["effect"][1].detail) == {"op": "PUSH"}
    assert "error" in dict(new["exhausted"][1].detail)
    # Everything the pass did happened at one instant: it reads the clock once.
    assert len({e.at for events in new.values() for e in events}) == 1


def test_second_pass_does_nothing(store: Store, clock: ManualClock) -> None:
    ids = _crash_scene(store, clock)
    store.reconcile()
    after_first = {jid: snapshot(store, jid) for jid in ids.values()}
    clock.advance(1)
    assert store.reconcile() == ReconcileReport(0, 0, 0)
    assert store.reconcile() == store.reconcile()
    assert {jid: snapshot(store, jid) for jid in ids.values()} == after_first


def test_dry_run_reports_the_same_and_changes_nothing(store: Store, clock: ManualClock) -> None:
    ids = _crash_scene(store, clock)
    before = {jid: snapshot(store, jid) for jid in ids.values()}
    stats = store.stats()
    dry = store.reconcile(dry_run=True)
    assert dry == ReconcileReport(leases_expired=3, effects_in_doubt=1, jobs_failed=1)
    assert store.reconcile(dry_run=True) == dry
    assert {jid: snapshot(store, jid) for jid in ids.values()} == before
    assert store.stats() == stats
    assert store.reconcile() == dry
    assert store.reconcile(dry_run=True) == ReconcileReport()


def test_idle_store_reports_zeros(store: Store) -> None:
    assert store.reconcile() == ReconcileReport(leases_expired=0, effects_in_doubt=0, jobs_failed=0)
    setup(store)
    store.plan("linear", {"n": 1})
    assert store.reconcile() == ReconcileReport()


def test_reconcile_never_moves_a_job_backwards(store: Store, clock: ManualClock) -> None:
    setup(store)
    order = {s: i for i, s in enumerate(["NEW", "A", "B", "DONE"])}
    ids = [store.plan("linear", {"n": n}, max_attempts=1 + n % 2) for n in range(6)]
    for n, jid in enumerate(ids):
        lease = store.lease_next("w1", ttl=5 + n)
        assert lease is not None
        assert lease.job_id == jid
        for state in ["A", "B", "DONE"][: n % 4]:
            store.advance(lease, state)
    states = {jid: store.state(jid) for jid in ids}
    for step in (0, 5, 6, 7, 100):
        clock.advance(step)
        store.reconcile()
        for jid in ids:
            now_state = store.state(jid)
            if now_state != "FAILED":
                assert order[now_state] >= order[states[jid]]
                states[jid] = now_state
    assert [store.state(j) for j in ids] == ["FAILED", "A", "FAILED", "DONE", "FAILED", "A"]


def test_expired_lease_reconciled_then_leased_logs_expiry_once(
    store: Store, clock: ManualClock
) -> None:
    setup(store)
    job_id = store.plan("linear", {"n": 1})
    lease = store.lease_next("w1")
    assert lease is not None
    expire(clock, lease)
    assert store.reconcile().leases_expired == 1
    again = store.lease_next("w2")
    assert again is not None
    assert [str(e.event) for e in store.history(job_id)] == [
        Event.PLANNED,
        Event.LEASED,
        Event.EXPIRED,
        Event.LEASED,
    ]


def test_start_of_a_stale_token_is_in_doubt_even_under_a_live_lease(
    store: Store, clock: ManualClock
) -> None:
    setup(store)
    job_id = store.plan("linear", {"n": 1})
    first = store.lease_next("w1")
    assert first is not None

    def stalls(ctx: EffectContext) -> object:
        expire(clock, first)
        return 1

    with pytest.raises(impl.LeaseLost):
        store.run_effect(first, "X", stalls)
    second = store.lease_next("w2")
    assert second is not None
    assert store.stats().in_doubt == 1
    assert store.reconcile() == ReconcileReport(leases_expired=0, effects_in_doubt=1, jobs_failed=0)
    assert [e.status for e in store.effects(job_id)] == [EffectStatus.IN_DOUBT]
    last = store.history(job_id)[-1]
    assert (str(last.event), dict(last.detail)) == (Event.EFFECT_IN_DOUBT, {"op": "X"})
    assert store.job(job_id).lease == second
