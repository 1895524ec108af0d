"""The circuit breaker against a tiny model, and the host guard's politeness on a clock.

The model keeps the breaker's meaning in other terms: "open until" a time (None when
closed), whether a probe is out, and the failures in a row. Requests are admitted and
later report success, failure or nothing, in any interleaving Hypothesis finds; every
decision and every counter must agree, and the invariants of a breaker hold after every
step.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from impl.download.breaker import Breaker, BreakerState, Decision
from impl.download.host import BreakerEvent, HostDeferred, HostGuard

THRESHOLD = 3
COOLDOWN = 10.0


class _Model:
    """The breaker in other words: open until a time, which probe is out, a streak."""

    def __init__(self) -> None:
        self.open_until: float | None = None
        self.probe_out: int | None = None  # the number of the probe in flight
        self.probes = 0
        self.streak = 0
        self.opens = 0
        self.failed_probes = 0
        self.half = False  # a cool-down ended and a probe was granted since

    def allow(self, now: float) -> Decision:
        if self.open_until is None:
            return Decision(go=True)
        if now < self.open_until and not self.half:
            return Decision(go=False, wait=self.open_until - now)
        self.half = True
        if self.probe_out is not None:
            return Decision(go=False, wait=COOLDOWN)
        self.probes += 1
        self.probe_out = self.probes
        return Decision(go=True, probe=self.probes)

    def success(self) -> None:
        self.open_until, self.probe_out, self.streak, self.half = None, None, 0, False

    def failure(self, now: float, probe: int) -> None:
        self.streak += 1
        if self.half:
            if probe and probe == self.probe_out:
                self.failed_probes += 1
                self._open(now)
        elif self.open_until is None and self.streak >= THRESHOLD:
            self._open(now)

    def abandon(self, probe: int) -> None:
        if probe and probe == self.probe_out:
            self.probe_out = None

    def _open(self, now: float) -> None:
        self.open_until, self.probe_out, self.half = now + COOLDOWN, None, False
        self.opens += 1


class BreakerMachine(RuleBasedStateMachine):
    """The breaker and the model, driven by the same requests on the same clock."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.breaker = Breaker(THRESHOLD, COOLDOWN)
        self.model = _Model()
        self.flying: list[int] = []  # admitted requests: their probe number (0: none)

    @rule(step=st.sampled_from([0.0, 0.5, COOLDOWN - 0.5, COOLDOWN, COOLDOWN + 1, 1000.0]))
    def tick(self, step: float) -> None:
        self.now += step

    @rule()
    def ask(self) -> None:
        got = self.breaker.allow(self.now)
        want = self.model.allow(self.now)
        assert got == want
        if got.go:
            self.flying.append(got.probe)

    def _land(self, data: st.DataObject) -> int:
        return self.flying.pop(data.draw(st.integers(0, len(self.flying) - 1)))

    @precondition(lambda self: self.flying)
    @rule(data=st.data())
    def succeed(self, data: st.DataObject) -> None:
        self._land(data)
        self.breaker.succeeded()
        self.model.success()

    @precondition(lambda self: self.flying)
    @rule(data=st.data())
    def fail(self, data: st.DataObject) -> None:
        probe = self._land(data)
        self.breaker.failed(self.now, "ConnectError", probe=probe)
        self.model.failure(self.now, probe)

    @precondition(lambda self: self.flying)
    @rule(data=st.data())
    def give_up(self, data: st.DataObject) -> None:
        probe = self._land(data)
        self.breaker.abandoned(probe)
        self.model.abandon(probe)

    @invariant()
    def agrees(self) -> None:
        b, m = self.breaker, self.model
        assert (b.failures, b.opens, b.failed_probes) == (m.streak, m.opens, m.failed_probes)
        assert (b.state is BreakerState.CLOSED) == (m.open_until is None)

    @invariant()
    def a_breaker_s_promises(self) -> None:
        b = self.breaker
        if b.state is BreakerState.CLOSED:
            assert b.failures < THRESHOLD or b.opens > 0
        # At most one probe of the current cool-down is out at a time.
        current = [p for p in self.flying if p and p == self.model.probe_out]
        assert len(current) <= 1
        # Open: no request goes before the cool-down is over.
        if b.state is BreakerState.OPEN:
            assert b.opened_at is not None
            assert b.opened_at <= self.now
            if self.now < b.opened_at + COOLDOWN:
                copy = Breaker(THRESHOLD, COOLDOWN, state=b.state, opened_at=b.opened_at)
                decision = copy.allow(self.now)
                assert not decision.go
                assert 0 < decision.wait <= COOLDOWN


TestBreaker = BreakerMachine.TestCase
TestBreaker.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _guard(clock: _Clock, *, rate: float = 0.0) -> HostGuard:
    return HostGuard(
        per_host=2, rate=rate, threshold=2, cooldown=30.0, clock=clock, sleep=clock.sleep
    )


def test_the_token_bucket_spaces_requests_to_one_host_not_to_others() -> None:
    clock = _Clock()
    guard = _guard(clock, rate=4.0)
    starts = []
    for _ in range(5):
        probe = guard.admit("a:80", "http://a/")
        starts.append(clock.now)
        guard.done("a:80", probe=probe, ok=True)
    assert starts == [100.0, 100.25, 100.5, 100.75, 101.0]
    before = clock.now
    guard.done("b:80", probe=guard.admit("b:80", "http://b/"), ok=True)
    assert clock.now == before  # another host has its own bucket


def test_a_pause_holds_every_request_to_the_host_and_a_long_one_hands_the_job_back() -> None:
    clock = _Clock()
    guard = _guard(clock)
    guard.pause("a:80", 1.5, "the server answered 429")
    guard.done("a:80", probe=guard.admit("a:80", "http://a/1"), ok=True)
    assert clock.slept == [1.5]
    guard.pause("a:80", 20.0, "the server answered 429")
    with pytest.raises(HostDeferred, match="429") as deferred:
        guard.admit("a:80", "http://a/2")
    assert deferred.value.delay == 20.0
    guard.done("b:80", probe=guard.admit("b:80", "http://b/"), ok=True)  # b is not paused
    (report,) = guard.reports()
    assert (report.host, report.throttled, report.deferred) == ("a:80", 2, 1)


def test_an_open_breaker_defers_until_the_probe_and_a_good_probe_closes_it() -> None:
    clock = _Clock()
    guard = _guard(clock)
    for _ in range(2):
        guard.done("a:80", probe=guard.admit("a:80", "http://a/"), ok=False, error="refused")
    with pytest.raises(HostDeferred, match=r"circuit open after 2 failure\(s\) in a row") as e:
        guard.admit("a:80", "http://a/")
    assert e.value.delay == 30.0
    assert "(last: refused)" in str(e.value)
    assert not guard.blocked("a:80")  # no probe has failed yet
    clock.now += 30.0
    probe = guard.admit("a:80", "http://a/")
    assert probe == 1
    guard.done("a:80", probe=probe, ok=False, error="refused")
    assert guard.blocked("a:80")
    clock.now += 30.0
    probe = guard.admit("a:80", "http://a/")
    assert probe == 2
    guard.done("a:80", probe=probe, ok=True)
    assert guard.admit("a:80", "http://a/") == 0  # closed again: not a probe
    guard.done("a:80", probe=0, ok=True)
    (report,) = guard.reports()
    assert (report.state, report.opens, report.failed_probes, report.deferred) == (
        "closed",
        2,
        1,
        1,
    )


def test_the_guard_reports_each_open_and_close_once_and_nothing_per_request() -> None:
    """What ``jobledger download`` records in the ledger: a breaker's transitions only
    (opened, opened again after a failed probe, closed), never each request's outcome."""
    clock = _Clock()
    guard = _guard(clock)
    events: list[BreakerEvent] = []
    guard.watch(events.append)
    for _ in range(5):  # successes of a closed breaker: nothing to report
        guard.done("a:80", probe=guard.admit("a:80", "http://a/"), ok=True)
    guard.done("a:80", probe=guard.admit("a:80", "http://a/"), ok=False, error="refused")
    assert events == []  # one failure is below the threshold
    guard.done("a:80", probe=guard.admit("a:80", "http://a/"), ok=False, error="refused")
    late = guard.admit("b:80", "http://b/")  # another host is not affected
    guard.done("b:80", probe=late, ok=True)
    clock.now += 30.0
    probe = guard.admit("a:80", "http://a/")
    guard.done("a:80", probe=probe, ok=False, error="HTTP 503")
    clock.now += 30.0
    probe = guard.admit("a:80", "http://a/")
    guard.done("a:80", probe=probe, ok=True)
    guard.done("a:80", probe=guard.admit("a:80", "http://a/"), ok=True)
    assert events == [
        BreakerEvent("a:80", "open", 2, "refused", 30.0, 1),
        BreakerEvent("a:80", "open", 3, "HTTP 503", 30.0, 2),
        BreakerEvent("a:80", "closed", 0, "HTTP 503", None, 3),
    ]
    guard.watch(None)
    for _ in range(2):
        guard.done("a:80", probe=guard.admit("a:80", "http://a/"), ok=False, error="x")
    assert len(events) == 3  # no listener: nothing reported


def test_a_transition_reported_late_by_another_thread_is_dropped() -> None:
    """Two threads may finish requests at once: the listener never sees an older
    transition after a newer one (the ledger keeps the newest)."""
    clock = _Clock()
    guard = _guard(clock)
    events: list[BreakerEvent] = []
    guard.watch(events.append)
    guard._report(BreakerEvent("a:80", "closed", 0, None, None, 2))
    guard._report(BreakerEvent("a:80", "open", 2, "refused", 30.0, 1))
    assert [e.seq for e in events] == [2]
