"""Stats: what an operator's dashboard shows, with zeros for every declared state."""

from __future__ import annotations

import pytest

import impl
from model import ManualClock, Stats, Store

from .flows import BRANCH, LINEAR, expire, plan_and_lease, setup


def _as_plain(stats: Stats) -> dict[str, object]:
    return {
        "by_state": {k: dict(v) for k, v in stats.by_state.items()},
        "leases_live": stats.leases_live,
        "leases_expired": stats.leases_expired,
        "in_doubt": stats.in_doubt,
        "failed": stats.failed,
        "oldest_eligible_age": stats.oldest_eligible_age,
    }


def _zeros(*flows: impl.Workflow) -> dict[str, dict[str, int]]:
    return {wf.name: dict.fromkeys(wf.states, 0) for wf in flows}


def test_empty_store_has_zero_counts_for_every_declared_state(store: Store) -> None:
    assert _as_plain(store.stats()) == {
        "by_state": _zeros(impl.DOWNLOAD),
        "leases_live": 0,
        "leases_expired": 0,
        "in_doubt": 0,
        "failed": 0,
        "oldest_eligible_age": None,
    }
    setup(store, LINEAR, BRANCH)
    assert _as_plain(store.stats())["by_state"] == _zeros(impl.DOWNLOAD, LINEAR, BRANCH)
    assert set(store.stats().by_state["linear"]) == {"NEW", "A", "B", "DONE", "FAILED"}


def test_counts_after_some_work(store: Store, clock: ManualClock) -> None:
    setup(store, LINEAR)
    start = clock()
    ids = [store.plan("linear", {"n": n}) for n in range(6)]
    store.plan("linear", {"n": "future"}, run_at=start + 1000)
    done = store.lease_next("w1")
    failed = store.lease_next("w1")
    live = store.lease_next("w1", ttl=100)
    dead = store.lease_next("w1", ttl=10)
    assert done is not None
    assert failed is not None
    assert live is not None
    assert dead is not None
    assert [done.job_id, failed.job_id, live.job_id, dead.job_id] == ids[:4]
    for state in ("A", "B", "DONE"):
        store.advance(done, state)
    store.fail(failed, "nope", retryable=False)
    store.advance(live, "A")
    clock.advance(10)
    stats = store.stats()
    expected = _zeros(impl.DOWNLOAD, LINEAR)
    expected["linear"].update({"NEW": 4, "A": 1, "DONE": 1, "FAILED": 1})
    assert _as_plain(stats) == {
        "by_state": expected,
        "leases_live": 1,
        "leases_expired": 1,
        "in_doubt": 0,
        "failed": 1,
        # ids[4], ids[5] planned at start, and the dead lease's job (run_at start too).
        "oldest_eligible_age": 10.0,
    }


def test_in_doubt_counts_dead_starts_before_and_after_reconcile(
    store: Store, clock: ManualClock
) -> None:
    setup(store)
    lease = plan_and_lease(store)

    def dies(ctx: impl.EffectContext) -> object:
        expire(clock, lease)
        return 1

    with pytest.raises(impl.LeaseLost):
        store.run_effect(lease, "X", dies)
    assert (store.stats().in_doubt, store.stats().leases_expired) == (1, 1)
    store.reconcile()
    assert (store.stats().in_doubt, store.stats().leases_expired) == (1, 0)
    again = store.lease_next("w2")
    assert again is not None
    store.run_effect(again, "X", lambda ctx: 2)
    assert store.stats().in_doubt == 0


def test_a_running_effect_is_not_in_doubt(store: Store) -> None:
    setup(store)
    lease = plan_and_lease(store)
    seen: list[int] = []
    store.run_effect(lease, "X", lambda ctx: seen.append(store.stats().in_doubt))
    assert seen == [0]


def test_oldest_eligible_age_ignores_ineligible_jobs(store: Store, clock: ManualClock) -> None:
    setup(store, LINEAR, BRANCH)
    start = clock()
    held = store.plan("linear", {"n": "held"}, priority=9)
    lease = store.lease_next("w1", ttl=1000)
    assert lease is not None
    assert lease.job_id == held
    clock.advance(5)
    skipped = store.plan("branch", {"n": "skipped"}, priority=9)
    finished = store.lease_next("w1")
    assert finished is not None
    assert finished.job_id == skipped
    store.advance(finished, "SKIPPED")
    store.plan("linear", {"n": "future"}, run_at=start + 500)
    assert store.stats().oldest_eligible_age is None
    clock.advance(3)
    store.plan("linear", {"n": "waiting"})
    clock.advance(4)
    assert store.stats().oldest_eligible_age == 4.0
    clock.now = start + 600
    assert store.stats().oldest_eligible_age == 592.0
    clock.now = start + 1000
    # The held lease just expired: its job, planned first, is eligible again.
    assert store.stats().oldest_eligible_age == 1000.0


def test_oldest_eligible_age_is_the_oldest_of_every_priority(
    store: Store, clock: ManualClock
) -> None:
    # The oldest eligible job can sit at any priority: not only the highest one, and not
    # only at one whose first job in run_at order is eligible.
    setup(store, LINEAR)
    store.plan("linear", {"n": "old, low"}, priority=0)
    clock.advance(10)
    store.plan("linear", {"n": "held, high"}, priority=7)
    store.plan("linear", {"n": "new, high"}, priority=7)
    lease = store.lease_next("w1", ttl=1000)
    assert lease is not None
    clock.advance(2)
    store.plan("linear", {"n": "newest, middle"}, priority=3)
    assert store.stats().oldest_eligible_age == 12.0
    # Every job of priorities 7 and 3 is leased: the oldest is found at priority 0.
    high = store.lease_next("w1", ttl=1000)
    middle = store.lease_next("w1", ttl=1000)
    assert high is not None
    assert middle is not None
    clock.advance(1)
    assert store.stats().oldest_eligible_age == 13.0
    low = store.lease_next("w1", ttl=1000)
    assert low is not None
    assert store.stats().oldest_eligible_age is None


def test_exhausted_jobs_are_not_eligible(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store, max_attempts=1)
    expire(clock, lease)
    assert store.stats().oldest_eligible_age is None
    assert (store.stats().leases_expired, store.stats().failed) == (1, 0)
    store.reconcile()
    assert (store.stats().leases_expired, store.stats().failed) == (0, 1)


def test_counts_stay_exact_through_reconcile_retry_and_prune(
    store: Store, clock: ManualClock
) -> None:
    """The backends keep the counts of finished jobs by a watermark that ``reconcile``
    moves (impl/*/rollup.py): a job finishing behind it, a finished job retried, a prune
    and a job planned after it must all show in the counts as a full count would."""
    setup(store, LINEAR)
    ids = [store.plan("linear", {"n": n}) for n in range(6)]

    def finish_one() -> None:
        lease = store.lease_next("w1")
        assert lease is not None
        for state in ("A", "B", "DONE"):
            store.advance(lease, state)

    def counts() -> dict[str, int]:
        return {s: n for s, n in store.stats().by_state["linear"].items() if n}

    finish_one()
    store.cancel(ids[1], "no")
    store.reconcile()
    assert counts() == {"NEW": 4, "DONE": 1, "FAILED": 1}
    finish_one()  # finishes behind the watermark
    assert counts() == {"NEW": 3, "DONE": 2, "FAILED": 1}
    store.retry(ids[1])  # a counted failed job is active again
    assert counts() == {"NEW": 4, "DONE": 2}
    assert store.stats().failed == 0
    store.reconcile()
    assert counts() == {"NEW": 4, "DONE": 2}
    store.cancel(ids[1], "no again")
    store.reconcile()
    assert counts() == {"NEW": 3, "DONE": 2, "FAILED": 1}
    clock.advance(1)
    store.prune(finished_before=clock(), keep_failed=True)
    assert counts() == {"NEW": 3, "FAILED": 1}
    store.plan("linear", {"n": 100})
    finish_one()
    store.reconcile()
    assert counts() == {"NEW": 3, "DONE": 1, "FAILED": 1}
