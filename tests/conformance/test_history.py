"""History: every job keeps an append-only record of what happened to it, in order."""

from __future__ import annotations

import pytest

import impl
from model import Event, ManualClock, Store

from .flows import BRANCH, expire, setup


def test_a_typical_life(store: Store, clock: ManualClock) -> None:
    setup(store)
    job_id = store.plan("linear", {"n": 1})
    lease = store.lease_next("w1")
    assert lease is not None
    clock.advance(1)
    store.renew(lease)
    store.run_effect(lease, "FETCH", lambda ctx: {"ok": True})
    store.advance(lease, "A")
    clock.advance(1)
    store.release(lease)
    lease = store.lease_next("w2")
    assert lease is not None
    store.run_effect(lease, "FETCH", lambda ctx: pytest.fail("replayed effects do not run"))
    store.advance(lease, "B")
    store.advance(lease, "A")  # a replay: not recorded
    store.advance(lease, "DONE")
    history = store.history(job_id)
    assert [(str(e.event), e.token, e.worker) for e in history] == [
        (Event.PLANNED, 0, None),
        (Event.LEASED, 1, "w1"),
        (Event.RENEWED, 1, "w1"),
        (Event.EFFECT_STARTED, 1, "w1"),
        (Event.EFFECT_RECORDED, 1, "w1"),
        (Event.ADVANCED, 1, "w1"),
        (Event.RELEASED, 1, "w1"),
        (Event.LEASED, 2, "w2"),
        (Event.ADVANCED, 2, "w2"),
        (Event.ADVANCED, 2, "w2"),
    ]
    start = history[0].at
    assert [e.at - start for e in history] == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert all(e.job_id == job_id for e in history)
    assert [dict(e.detail) for e in history if e.event == Event.ADVANCED] == [
        {"from": "NEW", "to": "A"},
        {"from": "A", "to": "B"},
        {"from": "B", "to": "DONE"},
    ]


def test_a_troubled_life(store: Store, clock: ManualClock) -> None:
    setup(store, BRANCH)
    job_id = store.plan("branch", {"n": 1})
    lease = store.lease_next("w1")
    assert lease is not None
    store.fail(lease, "timeout")
    clock.advance(1)
    lease = store.lease_next("w1")
    assert lease is not None
    store.advance(lease, "MID")
    expire(clock, lease)
    lease = store.lease_next("w2")
    assert lease is not None
    store.cancel(job_id, "operator")
    store.retry(job_id)
    lease = store.lease_next("w3")
    assert lease is not None
    store.advance(lease, "LEFT")
    assert [str(e.event) for e in store.history(job_id)] == [
        Event.PLANNED,
        Event.LEASED,
        Event.FAILED,
        Event.LEASED,
        Event.ADVANCED,
        Event.EXPIRED,
        Event.LEASED,
        Event.CANCELLED,
        Event.RETRIED,
        Event.LEASED,
        Event.ADVANCED,
    ]
    history = store.history(job_id)
    assert [e.token for e in history if e.event == Event.LEASED] == [1, 2, 3, 6]
    assert (history[5].token, history[5].worker) == (2, "w1")
    assert dict(history[2].detail) == {"error": "timeout", "retry_at": history[2].at + 1.0}
    assert dict(history[7].detail) == {"reason": "operator"}


def test_history_is_per_job(store: Store) -> None:
    setup(store)
    a = store.plan("linear", {"n": 1})
    b = store.plan("linear", {"n": 2})
    lease = store.lease_next("w1")
    assert lease is not None
    assert lease.job_id == a
    assert [str(e.event) for e in store.history(b)] == [Event.PLANNED]
    with pytest.raises(impl.UnknownJob):
        store.history("0" * 64)
