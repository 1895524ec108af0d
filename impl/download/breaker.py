"""A circuit breaker for one host: a small state machine over a clock, with no I/O.

::

    CLOSED --(failures in a row reach the threshold)--> OPEN
    OPEN   --(cool-down over: the next request is the probe)--> HALF_OPEN
    HALF_OPEN --(the probe fails)--> OPEN (a new cool-down)
    any    --(a request succeeds)--> CLOSED

A *failure* is a connection error, a timeout or a 5xx answer: the host, not the URL, is
in trouble. Any other answer (2xx, 3xx, 4xx) is a success: the host is up. While the
breaker is open, :meth:`Breaker.allow` says how long to wait, and the download pipeline
hands the job back for that long (no attempt spent) instead of asking a host that is
down. In HALF_OPEN exactly one request (the probe) is let through until its outcome is
reported; others wait.

Why not a library: pybreaker and circuitbreaker wrap a call and keep their own wall
clock, but the pipeline needs the state as data (for the summary), an injected clock
(for the tests) and a decision without a call ("how long until the probe?"); the
machine is forty lines, proved by a Hypothesis stateful test against a tiny model
(``tests/download/test_breaker.py``).

Breakers live in one process (one per host in the run's HTTP client). Several
processes each learn that a host is down after ``threshold`` failed requests of their
own: a handful of connection attempts, which is what sharing the decision through the
ledger would save, at the price of a ledger read or write per request. The ledger only
*records* each process's transitions (``Store.record_breaker``, written by
``jobledger download`` when a breaker opens or closes) so operators see them.
"""

from __future__ import annotations

import enum

from attrs import define, field, frozen


class BreakerState(enum.StrEnum):
    """Where a breaker is."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@frozen
class Decision:
    """What :meth:`Breaker.allow` decided: go, or wait ``wait`` seconds.

    ``probe`` is the probe's number (> 0) when this request is the probe after a
    cool-down, else 0; report the request's outcome with it, so that only the probe of
    the current cool-down decides (a request sent before the breaker opened and
    answering late is not the probe).
    """

    go: bool
    probe: int = 0
    wait: float = 0.0


@define
class Breaker:
    """The breaker of one host.

    Args:
        threshold: failures in a row that open it (>= 1).
        cooldown: seconds it stays open before a probe is let through (> 0).
    """

    threshold: int
    cooldown: float
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    """Failures in a row since the last success."""
    opened_at: float | None = None
    opens: int = 0
    """How often it opened (the first time and after each failed probe)."""
    failed_probes: int = 0
    down_since: float | None = None
    """When it last opened from closed (None while closed): how long the host is down."""
    outage_probes: int = 0
    """Probes that failed since ``down_since``."""
    last_error: str | None = None
    _probes: int = field(default=0, alias="probes")
    """Probes granted so far; the current probe's number while one is out."""
    _probing: bool = field(default=False, alias="probing")

    @property
    def closed(self) -> bool:
        """True while the breaker lets every request through."""
        return self.state is BreakerState.CLOSED

    def allow(self, now: float) -> Decision:
        """Decide whether a request may go now."""
        if self.state is BreakerState.CLOSED:
            return Decision(go=True)
        if self.state is BreakerState.OPEN:
            assert self.opened_at is not None
            left = self.opened_at + self.cooldown - now
            if left > 0:
                return Decision(go=False, wait=left)
            self.state = BreakerState.HALF_OPEN
        if self._probing:
            # One probe at a time: the others come back after a cool-down at most.
            return Decision(go=False, wait=self.cooldown)
        self._probing = True
        self._probes += 1
        return Decision(go=True, probe=self._probes)

    def _is_probe(self, probe: int) -> bool:
        return self._probing and probe == self._probes and probe > 0

    def succeeded(self) -> None:
        """A request got an answer from the host: close."""
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.down_since = None
        self._probing = False

    def failed(self, now: float, error: str, *, probe: int = 0) -> None:
        """A request failed because of the host (connection, timeout, 5xx)."""
        self.last_error = error
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN:
            if self._is_probe(probe):
                self.failed_probes += 1
                self.outage_probes += 1
                self._open(now)
            # Another request, sent before the breaker opened: the probe decides.
        elif self.state is BreakerState.CLOSED and self.failures >= self.threshold:
            self.down_since = now
            self.outage_probes = 0
            self._open(now)
        # OPEN: a request that began before the breaker opened; nothing more to learn.

    def abandoned(self, probe: int) -> None:
        """A request ended without an outcome (its worker stopped): if it was the probe,
        let another one go."""
        if self._is_probe(probe):
            self._probing = False

    def _open(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self.opened_at = now
        self.opens += 1
        self._probing = False
