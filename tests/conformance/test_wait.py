"""wait_for_work: an idle caller learns at once that a job is eligible, and only then.

Every backend must agree with the model on *when* a job counts as eligible for a waiter
(run_at, lease expiry, the kinds filter), and must wake a waiter on work planned by
another thread well before its timeout. Timeouts here are either tiny (the answer must
be False) or long (30 s: the test passes only if the store woke the waiter itself).
"""

from __future__ import annotations

import threading
import time

import pytest

from model import IdempotencyConflict, InvalidInput, ManualClock, Plan, Store

from .flows import BRANCH, LINEAR, TTL, StoreFactory, plan_and_lease, setup

LONG = 30.0
"""A timeout the tests below never wait out: returning before it proves a wake-up."""
WATCHDOG = 10.0
"""How long a test waits for a waiter it expects to return early."""


def test_an_eligible_job_answers_at_once(store: Store) -> None:
    setup(store)
    assert store.wait_for_work(0.0) is False
    store.plan("linear", {"n": 1})
    assert store.wait_for_work(0.0) is True
    assert store.wait_for_work(LONG, kinds=["linear"]) is True


def test_nothing_eligible_times_out(store: Store) -> None:
    setup(store)
    assert store.wait_for_work(0.05) is False


def test_a_future_run_at_is_eligible_once_the_clock_reaches_it(
    store: Store, clock: ManualClock
) -> None:
    setup(store)
    store.plan("linear", {"n": 1}, run_at=clock() + 100)
    assert store.wait_for_work(0.05) is False
    clock.advance(99)
    assert store.wait_for_work(0.05) is False
    clock.advance(1)
    assert store.wait_for_work(0.0) is True


def test_the_kinds_filter_ignores_other_kinds(store: Store) -> None:
    setup(store, LINEAR, BRANCH)
    store.plan("branch", {"n": 1})
    assert store.wait_for_work(0.05, kinds=["linear"]) is False
    assert store.wait_for_work(0.0, kinds=["linear", "branch"]) is True
    assert store.wait_for_work(0.0, kinds=["branch"]) is True
    with pytest.raises(InvalidInput):
        store.wait_for_work(0.0, kinds="branch")


def test_a_live_lease_is_not_work_but_its_expiry_is(store: Store, clock: ManualClock) -> None:
    setup(store)
    plan_and_lease(store)
    assert store.wait_for_work(0.05) is False
    clock.advance(TTL - 1)
    assert store.wait_for_work(0.05) is False
    clock.advance(1)
    assert store.wait_for_work(0.0) is True


def test_a_released_job_is_work_again_after_its_delay(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store)
    store.release(lease, delay=50)
    assert store.wait_for_work(0.05) is False
    clock.advance(50)
    assert store.wait_for_work(0.0) is True


def test_a_finished_job_is_not_work(store: Store) -> None:
    setup(store)
    lease = plan_and_lease(store)
    for state in ("A", "B", "DONE"):
        store.advance(lease, state)
    assert store.wait_for_work(0.05) is False


def test_a_job_without_attempts_left_is_work_for_lease_next_to_fail(
    store: Store, clock: ManualClock
) -> None:
    """lease_next moves it to the failed state, so a waiter must not sleep through it."""
    setup(store)
    plan_and_lease(store, max_attempts=1)
    clock.advance(TTL)
    assert store.wait_for_work(0.0) is True
    assert store.lease_next("w2") is None
    assert store.wait_for_work(0.05) is False


def test_a_bad_timeout_is_refused(store: Store) -> None:
    with pytest.raises(InvalidInput):
        store.wait_for_work(-1.0)


def _wait_in_thread(store: Store, **options: object) -> tuple[threading.Thread, list[bool]]:
    answers: list[bool] = []

    def wait() -> None:
        answers.append(store.wait_for_work(LONG, **options))  # type: ignore[arg-type]

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread, answers


def test_a_plan_by_another_handle_wakes_a_waiter(store_factory: StoreFactory) -> None:
    waiter = setup(store_factory())
    planner = store_factory()
    thread, answers = _wait_in_thread(waiter, kinds=["linear"])
    time.sleep(0.2)  # let it settle into its wait (if not, it answers True at once anyway)
    planner.plan("linear", {"n": 1})
    thread.join(WATCHDOG)
    assert answers == [True], "the waiter was not woken by the plan (it would sleep 30 s)"


def test_a_retry_by_an_operator_wakes_a_waiter(store_factory: StoreFactory) -> None:
    waiter = setup(store_factory())
    operator = store_factory()
    lease = plan_and_lease(waiter)
    waiter.fail(lease, "broken", retryable=False)
    thread, answers = _wait_in_thread(waiter)
    time.sleep(0.2)
    operator.retry(lease.job_id)
    thread.join(WATCHDOG)
    assert answers == [True], "the waiter was not woken by the retry"


def test_a_set_stop_event_ends_the_wait(store: Store) -> None:
    setup(store)
    stop = threading.Event()
    thread, answers = _wait_in_thread(store, stop=stop)
    time.sleep(0.1)
    stop.set()
    thread.join(WATCHDOG)
    assert answers == [False]


def test_a_rolled_back_plan_wakes_nobody(store_factory: StoreFactory) -> None:
    """A plan_many that fails leaves nothing eligible, and no sign of it either: on
    PostgreSQL the notification is part of the transaction, so it is never delivered."""
    waiter = setup(store_factory())
    planner = store_factory()
    lease = plan_and_lease(waiter, {"n": "done"}, payload={"v": 1})
    for state in ("A", "B", "DONE"):
        waiter.advance(lease, state)
    answers: list[bool] = []
    thread = threading.Thread(target=lambda: answers.append(waiter.wait_for_work(2.0)))
    thread.start()
    time.sleep(0.2)
    with pytest.raises(IdempotencyConflict):
        planner.plan_many("linear", [{"n": "new"}, Plan({"n": "done"}, payload={"v": 2})])
    thread.join(WATCHDOG)
    assert answers == [False], "a rolled-back plan woke the waiter"
    assert planner.jobs(state="NEW") == []
