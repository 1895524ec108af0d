"""Failure, backoff, exhaustion, and the operator's cancel and retry.

A failed attempt with attempts left waits out an exponential backoff; the last one, or a
non-retryable failure, puts the job in its workflow's failed state with the error kept.
Operators cancel and retry without a lease; both fence out whoever holds the job.
"""

from __future__ import annotations

import pytest

import impl
from model import Config, Event, ManualClock, Store

from .flows import BRANCH, StoreFactory, events, expire, plan_and_lease, setup, snapshot


def test_fail_backs_off_exponentially(store: Store, clock: ManualClock) -> None:
    setup(store)
    job_id = store.plan("linear", {"n": 1}, max_attempts=10)
    waits = []
    for attempt in range(1, 6):
        lease = store.lease_next("w1")
        assert lease is not None
        assert lease.attempt == attempt
        store.fail(lease, f"boom {attempt}")
        job = store.job(job_id)
        assert (job.state, job.lease, job.lease_worker, job.token) == ("NEW", None, None, attempt)
        assert job.last_error == f"boom {attempt}"
        waits.append(job.run_at - clock())
        clock.now = job.run_at - 0.5
        assert store.lease_next("w1") is None
        clock.now = job.run_at
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0]
    failures = [e for e in store.history(job_id) if e.event == Event.FAILED]
    assert [dict(e.detail)["error"] for e in failures] == [f"boom {n}" for n in range(1, 6)]
    assert all(dict(e.detail)["retry_at"] == e.at + w for e, w in zip(failures, waits, strict=True))


def test_backoff_is_capped_and_configurable(
    store_factory: StoreFactory, clock: ManualClock
) -> None:
    store = setup(store_factory(config=Config(backoff_base=3.0, backoff_cap=10.0)))
    job_id = store.plan("linear", {"n": 1}, max_attempts=10)
    waits = []
    for _ in range(4):
        lease = store.lease_next("w1")
        assert lease is not None
        store.fail(lease, "boom")
        waits.append(store.job(job_id).run_at - clock())
        clock.now = store.job(job_id).run_at
    assert waits == [3.0, 6.0, 10.0, 10.0]


def test_fail_with_an_explicit_delay(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store)
    store.fail(lease, "rate limited", delay=42)
    assert store.job(lease.job_id).run_at == clock() + 42
    lease2 = plan_and_lease(store, {"n": 2})
    store.fail(lease2, "again", delay=0)
    assert store.job(lease2.job_id).run_at == clock()


def test_not_retryable_enters_the_failed_state(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store)
    store.advance(lease, "A")
    planned_run_at = store.job(lease.job_id).run_at
    clock.advance(2)
    store.fail(lease, "404 not found", retryable=False)
    job = store.job(lease.job_id)
    assert (job.state, job.failed_from, job.last_error) == ("FAILED", "A", "404 not found")
    assert (job.lease, job.lease_worker, job.token, job.attempts) == (None, None, 1, 1)
    assert job.run_at == planned_run_at
    assert job.updated_at == clock()
    assert store.lease_next("w1") is None
    last = store.history(lease.job_id)[-1]
    assert (last.event, dict(last.detail)) == (Event.FAILED, {"error": "404 not found"})
    with pytest.raises(impl.LeaseLost):
        store.renew(lease)


def test_last_attempt_failing_exhausts_the_job(store: Store, clock: ManualClock) -> None:
    setup(store)
    job_id = store.plan("linear", {"n": 1}, max_attempts=2)
    lease = store.lease_next("w1")
    assert lease is not None
    store.fail(lease, "first")
    clock.advance(1)
    lease = store.lease_next("w1")
    assert lease is not None
    assert lease.attempt == 2
    store.fail(lease, "second")
    job = store.job(job_id)
    assert (job.state, job.attempts, job.last_error, job.failed_from) == (
        "FAILED",
        2,
        "second",
        "NEW",
    )
    clock.advance(1000)
    assert store.lease_next("w1") is None


def test_lease_next_fails_an_exhausted_job_and_goes_on(store: Store, clock: ManualClock) -> None:
    setup(store)
    dead = store.plan("linear", {"n": 1}, max_attempts=1, priority=5)
    other = store.plan("linear", {"n": 2})
    lease = store.lease_next("w1")
    assert lease is not None
    assert lease.job_id == dead
    expire(clock, lease)
    nxt = store.lease_next("w2")
    assert nxt is not None
    assert (nxt.job_id, nxt.token, nxt.worker) == (other, 1, "w2")
    job = store.job(dead)
    assert (job.state, job.failed_from, job.attempts, job.token) == ("FAILED", "NEW", 1, 1)
    assert (job.lease, job.lease_worker) == (None, None)
    assert isinstance(job.last_error, str)
    assert job.last_error
    assert events(store, dead) == ["planned", "leased", "expired", "failed"]
    expired = store.history(dead)[2]
    assert (expired.token, expired.worker) == (1, "w1")


def test_lease_next_returns_none_after_failing_the_only_job(
    store: Store, clock: ManualClock
) -> None:
    setup(store)
    lease = plan_and_lease(store, max_attempts=1)
    store.release(lease)
    # release gave the attempt back: the job is not exhausted.
    lease = store.lease_next("w1")
    assert lease is not None
    assert lease.attempt == 1
    expire(clock, lease)
    assert store.lease_next("w1") is None
    assert store.state(lease.job_id) == "FAILED"


def test_cancel_fences_out_the_holder(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store)
    store.advance(lease, "A")
    clock.advance(1)
    store.cancel(lease.job_id, "operator said so")
    job = store.job(lease.job_id)
    assert (job.state, job.failed_from, job.last_error, job.token) == (
        "FAILED",
        "A",
        "operator said so",
        2,
    )
    assert (job.lease, job.lease_worker, job.updated_at) == (None, None, clock())
    last = store.history(lease.job_id)[-1]
    assert (last.event, dict(last.detail)) == (Event.CANCELLED, {"reason": "operator said so"})
    before = snapshot(store, lease.job_id)
    for call in (
        lambda: store.advance(lease, "B"),
        lambda: store.renew(lease),
        lambda: store.fail(lease, "x"),
        lambda: store.release(lease),
        lambda: store.run_effect(lease, "op", lambda ctx: pytest.fail("fn ran")),
    ):
        with pytest.raises(impl.LeaseLost) as info:
            call()
        assert (info.value.token, info.value.current_token) == (1, 2)
    assert snapshot(store, lease.job_id) == before


def test_cancel_of_a_job_nobody_holds(store: Store) -> None:
    setup(store)
    job_id = store.plan("linear", {"n": 1})
    store.cancel(job_id, "not needed")
    job = store.job(job_id)
    assert (job.state, job.token, job.attempts, job.failed_from) == ("FAILED", 1, 0, "NEW")
    assert store.lease_next("w1") is None


def test_cancel_of_a_failed_job_is_a_no_op(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store)
    store.fail(lease, "original", retryable=False)
    before = snapshot(store, lease.job_id)
    clock.advance(5)
    store.cancel(lease.job_id, "second thoughts")
    assert snapshot(store, lease.job_id) == before
    assert store.job(lease.job_id).last_error == "original"


def test_cancel_of_another_terminal_state_raises(store: Store) -> None:
    setup(store, BRANCH)
    lease = plan_and_lease(store, kind="branch")
    store.advance(lease, "SKIPPED")
    before = snapshot(store, lease.job_id)
    with pytest.raises(impl.IllegalTransition) as info:
        store.cancel(lease.job_id, "too late")
    assert "SKIPPED" in str(info.value)
    assert snapshot(store, lease.job_id) == before


def test_operator_calls_on_unknown_jobs_raise(store: Store) -> None:
    for call in (lambda: store.cancel("a" * 64, "r"), lambda: store.retry("a" * 64)):
        with pytest.raises(impl.UnknownJob):
            call()


def test_retry_returns_to_the_failed_from_state(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store, max_attempts=3)
    store.advance(lease, "A")
    store.advance(lease, "B")
    store.fail(lease, "disk full", retryable=False)
    clock.advance(100)
    store.retry(lease.job_id)
    job = store.job(lease.job_id)
    assert (job.state, job.attempts, job.token, job.run_at) == ("B", 0, 2, clock())
    assert (job.lease, job.lease_worker, job.last_error) == (None, None, "disk full")
    assert events(store, lease.job_id)[-2:] == ["failed", "retried"]
    again = store.lease_next("w2")
    assert again is not None
    assert (again.job_id, again.token, again.attempt, again.state) == (lease.job_id, 3, 1, "B")
    assert store.advance(again, "DONE") is True


def test_retry_after_cancel_fences_the_old_holder(store: Store) -> None:
    setup(store)
    lease = plan_and_lease(store)
    store.cancel(lease.job_id, "stop")
    store.retry(lease.job_id)
    assert store.job(lease.job_id).token == 3
    with pytest.raises(impl.LeaseLost):
        store.advance(lease, "A")
    assert store.state(lease.job_id) == "NEW"


@pytest.mark.parametrize("done", [False, True])
def test_retry_of_a_job_not_failed_raises(store: Store, done: bool) -> None:
    setup(store, BRANCH)
    lease = plan_and_lease(store, kind="branch")
    if done:
        store.advance(lease, "SKIPPED")
    before = snapshot(store, lease.job_id)
    with pytest.raises(impl.IllegalTransition):
        store.retry(lease.job_id)
    assert snapshot(store, lease.job_id) == before


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"error": 42}, id="error-not-str"),
        pytest.param({"error": "x", "delay": -1}, id="negative-delay"),
    ],
)
def test_bad_fail_arguments(store: Store, kwargs: dict[str, object]) -> None:
    setup(store)
    lease = plan_and_lease(store)
    before = snapshot(store, lease.job_id)
    with pytest.raises(impl.InvalidInput):
        store.fail(lease, **kwargs)  # type: ignore[arg-type]
    assert snapshot(store, lease.job_id) == before


def test_cancel_of_an_expired_lease_logs_no_expiry(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store)
    expire(clock, lease)
    store.cancel(lease.job_id, "stop")
    assert events(store, lease.job_id) == ["planned", "leased", "cancelled"]
    job = store.job(lease.job_id)
    assert (job.lease_worker, job.lease_expires_at, job.token) == (None, None, 2)
    assert store.reconcile() == impl.ReconcileReport()
