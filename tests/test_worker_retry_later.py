"""``impl.RetryLater``: a handler says the world is wrong, not the job; no attempt is spent."""

from __future__ import annotations

from pathlib import Path

import pytest

import impl
from impl.sqlite.store import SqliteStore
from model import Config, Event, ManualClock, MemoryStore, Store, Workflow

FLOW = Workflow("flow", ["A", "B", "C"], [("A", "B"), ("B", "C")], initial="A", terminal=["C"])


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path, clock: ManualClock) -> Store:
    config = Config(backoff_base=3.0, max_attempts=2)
    if request.param == "memory":
        return MemoryStore(clock=clock, config=config)
    return SqliteStore(tmp_path / "j.sqlite", clock=clock, config=config)


def test_retry_later_releases_with_the_delay_and_spends_no_attempt(
    store: Store, clock: ManualClock
) -> None:
    store.register(FLOW)
    jid = store.plan("flow", {"n": 1})
    calls: list[int] = []

    def handler(ctx: impl.JobContext) -> None:
        calls.append(ctx.lease.attempt)
        ctx.effect("WRITE", lambda _e: {"wrote": 1})
        raise impl.RetryLater("disk full: /out", delay=7.5)

    worker = impl.Worker(store, {"flow": handler})
    # More rounds than max_attempts (2): a fault of the world never exhausts the job.
    for _ in range(4):
        assert worker.run_once() is True
        info = store.job(jid)
        assert (info.state, info.attempts, info.last_error) == ("A", 0, None)
        assert info.run_at == clock() + 7.5
        assert worker.run_once() is False  # not eligible before the delay
        clock.advance(7.5)
    assert calls == [1, 1, 1, 1]
    released = [h for h in store.history(jid) if h.event == Event.RELEASED]
    assert [dict(h.detail) for h in released] == [{"reason": "disk full: /out"}] * 4
    assert [e.status for e in store.effects(jid)] == ["done"]  # the recorded effect is kept


def test_retry_later_without_a_delay_waits_the_first_backoff(
    store: Store, clock: ManualClock
) -> None:
    store.register(FLOW)
    jid = store.plan("flow", {"n": 1})

    def handler(ctx: impl.JobContext) -> None:
        raise impl.RetryLater("host down")

    impl.Worker(store, {"flow": handler}).run_once()
    info = store.job(jid)
    assert (info.attempts, info.run_at) == (0, clock() + 3.0)


def test_retry_later_refuses_a_negative_delay() -> None:
    with pytest.raises(ValueError, match="delay"):
        impl.RetryLater("x", delay=-1)
