"""Leases: who may act on a job, in which order jobs are handed out, and fencing.

A lease is one attempt with a fresh fencing token. Every call that carries a lease checks
the token against the job's current one and the expiry against the store's clock; a stale,
expired or foreign lease raises ``LeaseLost`` and changes nothing at all.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import pytest

import impl
from model import Config, Event, Lease, ManualClock, Store

from .flows import BRANCH, LINEAR, StoreFactory, expire, plan_and_lease, setup, snapshot


def test_lease_carries_the_job_and_a_first_token(store: Store, clock: ManualClock) -> None:
    setup(store)
    job_id = store.plan("linear", {"n": 1}, payload={"p": 1})
    lease = store.lease_next("w1", ttl=12.5)
    assert lease == Lease(
        job_id=job_id,
        kind="linear",
        token=1,
        worker="w1",
        expires_at=clock() + 12.5,
        attempt=1,
        state="NEW",
        identity={"n": 1},
        payload={"p": 1},
    )
    job = store.job(job_id)
    assert (job.token, job.attempts, job.lease) == (1, 1, lease)
    assert (job.lease_worker, job.lease_expires_at) == ("w1", clock() + 12.5)


def test_default_ttl_comes_from_the_config(store_factory: StoreFactory, clock: ManualClock) -> None:
    store = setup(store_factory(config=Config(lease_ttl=7.0)))
    lease = plan_and_lease(store)
    assert lease.expires_at == clock() + 7.0
    assert store.renew(lease).expires_at == clock() + 7.0


def test_nothing_eligible_returns_none(store: Store) -> None:
    setup(store)
    assert store.lease_next("w1") is None


def test_order_is_priority_then_run_at_then_planned_order(store: Store, clock: ManualClock) -> None:
    setup(store)
    now = clock()
    first_planned = store.plan("linear", {"n": "a"})
    high = store.plan("linear", {"n": "b"}, priority=5)
    earlier = store.plan("linear", {"n": "c"}, run_at=now - 10)
    second_planned = store.plan("linear", {"n": "d"})
    negative = store.plan("linear", {"n": "e"}, priority=-1, run_at=now - 100)
    order = []
    while (lease := store.lease_next("w1")) is not None:
        order.append(lease.job_id)
    assert order == [high, earlier, first_planned, second_planned, negative]


def test_a_job_becomes_eligible_exactly_at_run_at(store: Store, clock: ManualClock) -> None:
    setup(store)
    job_id = store.plan("linear", {"n": 1}, run_at=clock() + 10)
    clock.advance(9.5)
    assert store.lease_next("w1") is None
    clock.advance(0.5)
    lease = store.lease_next("w1")
    assert lease is not None
    assert lease.job_id == job_id


def test_kinds_filter(store: Store) -> None:
    setup(store, LINEAR, BRANCH)
    linear = store.plan("linear", {"n": 1})
    branch = store.plan("branch", {"n": 1})
    assert store.lease_next("w1", kinds=["nothing-of-that-kind"]) is None
    lease = store.lease_next("w1", kinds=["branch"])
    assert lease is not None
    assert lease.job_id == branch
    lease = store.lease_next("w1", kinds=["branch", "linear"])
    assert lease is not None
    assert lease.job_id == linear


@pytest.mark.parametrize("kinds", [["branch"], ["branch", "nothing-of-that-kind"]])
def test_a_kinds_filter_ends_expired_leases_and_fails_exhausted_jobs_of_its_kinds_only(
    store: Store, clock: ManualClock, kinds: list[str]
) -> None:
    """The general claim (an expired lease ahead, an exhausted job ahead) filters by kind
    as the usual one does, with one kind and with several."""
    setup(store, LINEAR, BRANCH)
    other = plan_and_lease(store, {"n": 0}, kind="linear", max_attempts=1)
    exhausted = plan_and_lease(store, {"n": 1}, kind="branch", max_attempts=1)
    expired = plan_and_lease(store, {"n": 2}, kind="branch")
    waiting = store.plan("branch", {"n": 3})
    clock.advance(max(lease.expires_at for lease in (other, exhausted, expired)) - clock() + 1)
    first = store.lease_next("w2", kinds=kinds)
    assert first is not None
    assert first.job_id == expired.job_id, "the exhausted job failed, the expired lease ended"
    assert store.state(exhausted.job_id) == "FAILED"
    assert store.state(other.job_id) != "FAILED", "a job of another kind is left alone"
    assert store.job(other.job_id).token == other.token
    second = store.lease_next("w2", kinds=kinds)
    assert second is not None
    assert second.job_id == waiting
    assert store.lease_next("w2", kinds=kinds) is None


def test_a_live_lease_is_exclusive(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store)
    clock.now = lease.expires_at - 0.001
    assert store.lease_next("w2") is None


def test_terminal_jobs_are_never_leased(store: Store) -> None:
    setup(store)
    lease = plan_and_lease(store)
    for state in ("A", "B", "DONE"):
        assert store.advance(lease, state) is True
    assert store.lease_next("w1") is None
    assert store.job(lease.job_id).lease is None


def test_expiry_is_at_exactly_expires_at(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store)
    clock.now = lease.expires_at - 0.25
    renewed = store.renew(lease, ttl=1.0)
    assert renewed.expires_at == clock() + 1.0
    expire(clock, renewed)
    before = snapshot(store, lease.job_id)
    with pytest.raises(impl.LeaseLost) as info:
        store.renew(lease)
    assert (info.value.job_id, info.value.token, info.value.current_token) == (lease.job_id, 1, 1)
    assert snapshot(store, lease.job_id) == before
    assert store.job(lease.job_id).lease is None
    taken = store.lease_next("w2")
    assert taken is not None
    assert (taken.job_id, taken.token, taken.worker) == (lease.job_id, 2, "w2")


def test_tokens_strictly_increase(store: Store, clock: ManualClock) -> None:
    setup(store)
    job_id = store.plan("linear", {"n": 1}, max_attempts=10)
    tokens = []
    lease = store.lease_next("w1")
    assert lease is not None
    tokens.append(lease.token)
    expire(clock, lease)
    lease = store.lease_next("w2")
    assert lease is not None
    tokens.append(lease.token)
    store.release(lease)
    lease = store.lease_next("w1")
    assert lease is not None
    tokens.append(lease.token)
    store.fail(lease, "boom", delay=0)
    lease = store.lease_next("w1")
    assert lease is not None
    tokens.append(lease.token)
    assert tokens == [1, 2, 3, 4]
    assert store.job(job_id).token == 4


# Every call that takes a lease, with arguments that would otherwise succeed.
LEASED_CALLS: dict[str, Callable[[Store, Lease], object]] = {
    "renew": lambda s, lease: s.renew(lease),
    "release": lambda s, lease: s.release(lease),
    "advance": lambda s, lease: s.advance(lease, "A"),
    "run_effect": lambda s, lease: s.run_effect(lease, "op", lambda ctx: pytest.fail("fn ran")),
    "fail": lambda s, lease: s.fail(lease, "boom"),
}


@pytest.mark.parametrize("call", sorted(LEASED_CALLS))
def test_expired_lease_is_lost_even_if_nobody_took_the_job(
    store: Store, clock: ManualClock, call: str
) -> None:
    setup(store)
    lease = plan_and_lease(store)
    expire(clock, lease)
    before = snapshot(store, lease.job_id)
    with pytest.raises(impl.LeaseLost) as info:
        LEASED_CALLS[call](store, lease)
    assert info.value.current_token == 1
    assert snapshot(store, lease.job_id) == before


@pytest.mark.parametrize("call", sorted(LEASED_CALLS))
def test_stale_lease_changes_nothing(store: Store, clock: ManualClock, call: str) -> None:
    setup(store)
    old = plan_and_lease(store)
    expire(clock, old)
    new = store.lease_next("w2")
    assert new is not None
    assert new.token == 2
    before = snapshot(store, old.job_id)
    with pytest.raises(impl.LeaseLost) as info:
        LEASED_CALLS[call](store, old)
    assert (info.value.token, info.value.current_token) == (1, 2)
    assert snapshot(store, old.job_id) == before
    # The new holder is unaffected.
    assert store.advance(new, "A") is True


@pytest.mark.parametrize("call", sorted(LEASED_CALLS))
def test_foreign_lease_changes_nothing(store: Store, call: str) -> None:
    setup(store)
    mine = plan_and_lease(store, {"n": 1})
    other_job = store.plan("linear", {"n": 2})
    # A lease forged for another job, and one with a token the job never issued.
    forged = attrs.evolve(mine, job_id=other_job)
    future = attrs.evolve(mine, token=mine.token + 1)
    before_other = snapshot(store, other_job)
    before_mine = snapshot(store, mine.job_id)
    for bad in (forged, future):
        with pytest.raises(impl.LeaseLost):
            LEASED_CALLS[call](store, bad)
    assert snapshot(store, other_job) == before_other
    assert snapshot(store, mine.job_id) == before_mine


def test_lease_of_an_unknown_job_raises_unknown_job(store: Store) -> None:
    setup(store)
    lease = plan_and_lease(store)
    with pytest.raises(impl.UnknownJob):
        store.renew(attrs.evolve(lease, job_id="e" * 64))


def test_renew_extends_from_now_and_keeps_the_token(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store)
    clock.advance(20)
    renewed = store.renew(lease, ttl=100)
    assert renewed == attrs.evolve(lease, expires_at=clock() + 100)
    assert store.job(lease.job_id).lease == renewed
    clock.advance(99)
    # The old Lease object is still good: expiry is the store's, not the object's.
    assert store.advance(lease, "A") is True
    assert store.renew(lease, ttl=5).state == "A"
    assert [str(e.event) for e in store.history(lease.job_id)] == [
        Event.PLANNED,
        Event.LEASED,
        Event.RENEWED,
        Event.ADVANCED,
        Event.RENEWED,
    ]


def test_release_gives_back_the_attempt_and_sets_run_at(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store)
    store.release(lease, delay=15)
    job = store.job(lease.job_id)
    assert (job.attempts, job.token, job.lease, job.lease_worker) == (0, 1, None, None)
    assert job.run_at == clock() + 15
    assert job.state == "NEW"
    with pytest.raises(impl.LeaseLost):
        store.renew(lease)
    clock.advance(14.9)
    assert store.lease_next("w1") is None
    clock.advance(0.1)
    again = store.lease_next("w2")
    assert again is not None
    assert (again.token, again.attempt) == (2, 1)


def test_release_without_delay_is_eligible_at_once(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store, run_at=clock() - 50)
    store.release(lease)
    assert store.job(lease.job_id).run_at == clock()
    again = store.lease_next("w1")
    assert again is not None
    assert again.job_id == lease.job_id


def test_release_keeps_its_reason_in_the_history(store: Store, clock: ManualClock) -> None:
    """A job handed back because the world is wrong (disk full, host down) says why."""
    setup(store)
    lease = plan_and_lease(store)
    store.release(lease, delay=5, reason="disk full: /out needs 1 MiB")
    job = store.job(lease.job_id)
    assert (job.attempts, job.run_at, job.last_error) == (0, clock() + 5, None)
    released = [e for e in store.history(lease.job_id) if e.event == Event.RELEASED]
    assert [(dict(e.detail), e.token, e.worker) for e in released] == [
        ({"reason": "disk full: /out needs 1 MiB"}, 1, "w1")
    ]


def test_release_without_a_reason_keeps_an_empty_detail(store: Store) -> None:
    setup(store)
    lease = plan_and_lease(store)
    store.release(lease)
    released = [e for e in store.history(lease.job_id) if e.event == Event.RELEASED]
    assert [dict(e.detail) for e in released] == [{}]


def test_a_release_reason_that_is_not_text_is_refused(store: Store) -> None:
    setup(store)
    lease = plan_and_lease(store)
    before = snapshot(store, lease.job_id)
    with pytest.raises(impl.InvalidInput):
        store.release(lease, reason=42)  # type: ignore[arg-type]
    assert snapshot(store, lease.job_id) == before


@pytest.mark.parametrize("reason", ["nul \x00 inside", "lone \udcff surrogate"])
def test_a_release_reason_no_backend_can_store_is_refused(store: Store, reason: str) -> None:
    """The same rule as for fail's error and cancel's reason (model.validate.check_text)."""
    setup(store)
    lease = plan_and_lease(store)
    before = snapshot(store, lease.job_id)
    with pytest.raises(impl.InvalidInput, match="release reason"):
        store.release(lease, reason=reason)
    assert snapshot(store, lease.job_id) == before


def test_expiry_counts_the_attempt_and_keeps_run_at(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store)
    planned_run_at = store.job(lease.job_id).run_at
    expire(clock, lease)
    again = store.lease_next("w2")
    assert again is not None
    assert again.attempt == 2
    assert store.job(lease.job_id).run_at == planned_run_at


def test_leases_lists_live_and_expired(store: Store, clock: ManualClock) -> None:
    setup(store)
    first = plan_and_lease(store, {"n": 1}, worker="w1")
    clock.advance(10)
    second = plan_and_lease(store, {"n": 2}, worker="w2")
    clock.now = first.expires_at
    rows = store.leases()
    assert [(r.job_id, r.worker, r.token, r.expires_at, r.live) for r in rows] == [
        (first.job_id, "w1", 1, first.expires_at, False),
        (second.job_id, "w2", 1, second.expires_at, True),
    ]
    assert [(r.kind, r.state) for r in rows] == [("linear", "NEW"), ("linear", "NEW")]
    assert store.job(first.job_id).lease is None
    assert store.job(first.job_id).lease_worker == "w1"
    assert store.job(second.job_id).lease == second
    assert second.expires_at == first.expires_at + 10 == clock() + 10


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"worker": ""}, id="empty-worker"),
        pytest.param({"worker": "w", "ttl": 0}, id="zero-ttl"),
        pytest.param({"worker": "w", "ttl": -1}, id="negative-ttl"),
    ],
)
def test_bad_lease_arguments(store: Store, kwargs: dict[str, object]) -> None:
    setup(store)
    job_id = store.plan("linear", {"n": 1})
    before = snapshot(store, job_id)
    with pytest.raises(impl.InvalidInput):
        store.lease_next(**kwargs)  # type: ignore[arg-type]
    assert snapshot(store, job_id) == before


def test_negative_release_delay_is_refused(store: Store) -> None:
    setup(store)
    lease = plan_and_lease(store)
    before = snapshot(store, lease.job_id)
    with pytest.raises(impl.InvalidInput):
        store.release(lease, delay=-1)
    assert snapshot(store, lease.job_id) == before


def test_empty_kinds_leases_nothing(store: Store) -> None:
    setup(store)
    job_id = store.plan("linear", {"n": 1})
    assert store.lease_next("w1", kinds=[]) is None
    assert store.job(job_id).token == 0


def test_times_round_trip_exactly(store: Store, clock: ManualClock) -> None:
    """Times are float seconds of the store's clock, kept exactly: no rounding to a tick."""
    setup(store)
    clock.now = 1_234_567.123456789
    run_at = clock.now - 0.000_123_4
    job_id = store.plan("linear", {"n": 1}, run_at=run_at)
    job = store.job(job_id)
    assert (job.run_at, job.created_at, job.updated_at) == (run_at, clock.now, clock.now)
    lease = store.lease_next("w1", ttl=0.1234567)
    assert lease is not None
    assert lease.expires_at == clock.now + 0.1234567
    assert store.job(job_id).lease_expires_at == clock.now + 0.1234567


def test_renew_and_expiry_update_updated_at(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store)
    clock.advance(5)
    store.renew(lease)
    assert store.job(lease.job_id).updated_at == clock()
    expire(clock, store.renew(lease, ttl=1))
    clock.advance(1)
    again = store.lease_next("w2")
    assert again is not None
    assert store.job(lease.job_id).updated_at == clock()


def test_renewed_lease_reports_the_current_state(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store)
    store.advance(lease, "A")
    renewed = store.renew(lease, ttl=3)
    assert (renewed.state, renewed.attempt, renewed.token, renewed.worker) == ("A", 1, 1, "w1")
    assert renewed.expires_at == clock() + 3


def test_a_lease_is_data_any_handle_can_check(store_factory: StoreFactory) -> None:
    """Two handles on one database (two connections, or two processes) share every lease."""
    first = setup(store_factory())
    second = store_factory()
    job_id = first.plan("linear", {"n": 1})
    lease = first.lease_next("w1")
    assert lease is not None
    assert second.lease_next("w2") is None
    assert second.job(job_id).lease == lease
    assert second.advance(lease, "A") is True
    assert first.state(job_id) == "A"
    second.cancel(job_id, "stop")
    with pytest.raises(impl.LeaseLost):
        first.advance(lease, "B")
