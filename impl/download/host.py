"""What the download pipeline knows about each host, and the politeness it keeps with it.

One :class:`HostGuard` per HTTP client (so per process) holds, for every ``host:port``:

* a **concurrency slot** (at most ``per_host`` requests in flight);
* a **token bucket** (at most ``download_rate_per_host`` requests per second, evenly
  spaced; 0 turns it off);
* a **pause**: a ``429``, or a ``503`` with ``Retry-After``, pauses the *host*, not just
  the request that received it: every request to that host waits it out;
* a **circuit breaker** (``breaker.py``): connection failures and 5xx in a row open it,
  and the host's requests are refused for a cool-down instead of being sent.

When a breaker opens or closes, the guard tells its listener (:meth:`HostGuard.watch`)
once, with a :class:`BreakerEvent`: ``jobledger download`` records it in the ledger
(``Store.record_breaker``) so that ``jobledger status`` shows it. Only those
transitions are reported, never each request.

A wait of at most :data:`HOLD_SECONDS` is slept in the worker thread; a longer one (an
open breaker, a long ``Retry-After``) raises :class:`HostDeferred`, and the pipeline hands
the job back for that long without spending an attempt, so the thread serves another
host meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from attrs import define, frozen

from impl.download.breaker import Breaker, BreakerState
from impl.download.errors import DownloadError

HOLD_SECONDS = 2.0
"""Longest wait for a host slept in place; longer waits hand the job back."""


class HostDeferred(DownloadError):
    """The host cannot be asked now (breaker open, paused by the server): try later.

    Not the job's fault: the pipeline turns it into :class:`impl.RetryLater` with
    ``delay`` seconds, so no attempt is spent.
    """

    retryable = True

    def __init__(self, host: str, delay: float, reason: str, *, url: str = "") -> None:
        super().__init__(f"host {host}: {reason}; retry in {delay:.1f} s", url=url)
        self.host = host
        self.delay = delay
        self.reason = reason


@frozen
class HostReport:
    """What one host did to the run (for the summary and ``--json``).

    Attributes:
        host: ``host:port``.
        state: the breaker's state at the end (closed, open, half_open).
        opens: how often the breaker opened.
        failed_probes: probes after a cool-down that failed.
        failures: failures in a row at the end (0 once the host answered again).
        deferred: times a job of this host was handed back without an attempt.
        throttled: answers that paused the host (429, or 503 with Retry-After).
        last_error: the last failure seen from this host.
    """

    host: str
    state: str
    opens: int
    failed_probes: int
    failures: int
    deferred: int
    throttled: int
    last_error: str | None


@frozen
class BreakerEvent:
    """A host's breaker opened (probe due in ``cooldown`` seconds) or closed.

    ``seq`` counts the host's transitions, so a listener never records an older one
    after a newer one that another thread reported first.
    """

    host: str
    state: str
    failures: int
    last_error: str | None
    cooldown: float | None
    seq: int


@define
class _Bucket:
    """A token bucket of one host: ``rate`` tokens per second, at most one banked.

    A caller takes a token even when none is left (the count goes negative) and sleeps
    off the debt, so concurrent callers queue in order instead of racing.
    """

    rate: float
    tokens: float = 1.0
    stamp: float | None = None

    def take(self, now: float) -> float:
        if self.stamp is not None:
            self.tokens = min(1.0, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1.0
        return max(-self.tokens / self.rate, 0.0)


@define
class _Host:
    slot: threading.BoundedSemaphore
    breaker: Breaker
    bucket: _Bucket | None
    paused_until: float = 0.0
    pause_reason: str = ""
    deferred: int = 0
    throttled: int = 0
    changes: int = 0
    """Transitions of the breaker (opened, closed) so far: :attr:`BreakerEvent.seq`."""


class HostGuard:
    """Per-host slots, rate, pauses and breakers, shared by every thread of a client.

    Args:
        per_host: requests in flight per host.
        rate: requests per second per host (0: no limit).
        threshold: failures in a row that open a host's breaker.
        cooldown: seconds a breaker stays open before one probe.
        patience: seconds a host must stay down (with a failed probe) before
            :meth:`blocked` gives up on it.
        clock: monotonic seconds (tests may inject one).
        sleep: how to wait (tests may inject one).
    """

    def __init__(
        self,
        *,
        per_host: int,
        rate: float,
        threshold: int,
        cooldown: float,
        patience: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.per_host = per_host
        self.rate = rate
        self.threshold = threshold
        self.cooldown = cooldown
        self.patience = patience
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._hosts: dict[str, _Host] = {}
        self._listener: Callable[[BreakerEvent], None] | None = None
        # Reports leave in order, one at a time, outside the lock the requests take.
        self._report_lock = threading.Lock()
        self._reported: dict[str, int] = {}

    def watch(self, listener: Callable[[BreakerEvent], None] | None) -> None:
        """Call ``listener`` whenever a host's breaker opens or closes (None: stop).

        It runs in the thread whose request caused the change, after the request's
        slot is freed; it must not raise.
        """
        self._listener = listener

    def _host(self, host: str) -> _Host:
        with self._lock:
            found = self._hosts.get(host)
            if found is None:
                found = _Host(
                    slot=threading.BoundedSemaphore(self.per_host),
                    breaker=Breaker(self.threshold, self.cooldown),
                    bucket=_Bucket(self.rate) if self.rate > 0 else None,
                )
                self._hosts[host] = found
            return found

    def _defer(self, host: str, h: _Host, delay: float, reason: str, url: str) -> HostDeferred:
        with self._lock:
            h.deferred += 1
        return HostDeferred(host, delay, reason, url=url)

    def defer(self, host: str, delay: float, reason: str, *, url: str = "") -> HostDeferred:
        """Return the :class:`HostDeferred` that hands a job of ``host`` back (counted in
        the host's report)."""
        return self._defer(host, self._host(host), delay, reason, url)

    def admit(self, host: str, url: str) -> int:
        """Wait until a request to ``host`` may go and take its slot; return the
        breaker's probe number (0: not a probe). Call :meth:`done` after it, whatever
        happened.

        Raises:
            HostDeferred: the host is paused or its breaker is open for longer than
                :data:`HOLD_SECONDS`.
        """
        h = self._host(host)
        while True:
            with self._lock:
                now = self._clock()
                pause = h.paused_until - now
                reason = h.pause_reason
                decision = None if pause > 0 else h.breaker.allow(now)
            if decision is None:
                if pause > HOLD_SECONDS:
                    raise self._defer(host, h, pause, reason, url)
                self._sleep(pause)
                continue
            if not decision.go:
                b = h.breaker
                raise self._defer(
                    host,
                    h,
                    decision.wait,
                    f"circuit open after {b.failures} failure(s) in a row "
                    f"(last: {b.last_error}); waiting for a probe",
                    url,
                )
            break
        h.slot.acquire()
        if h.bucket is not None:
            with self._lock:
                wait = h.bucket.take(self._clock())
            if wait > 0:
                self._sleep(wait)
        return decision.probe

    def done(self, host: str, *, probe: int, ok: bool | None, error: str = "") -> None:
        """Report a request's outcome and free its slot.

        ``ok`` True: the host answered (any status but 5xx); False: it failed
        (connection, timeout, 5xx); None: no outcome (the caller gave up).
        """
        h = self._host(host)
        with self._lock:
            b = h.breaker
            was, opens = b.state, b.opens
            if ok is True:
                b.succeeded()
            elif ok is False:
                b.failed(self._clock(), error, probe=probe)
            else:
                b.abandoned(probe)
            event = None
            if b.opens != opens or (was is not BreakerState.CLOSED and b.closed):
                h.changes += 1
                event = BreakerEvent(
                    host=host,
                    state="closed" if b.closed else "open",
                    failures=b.failures,
                    last_error=b.last_error,
                    cooldown=None if b.closed else b.cooldown,
                    seq=h.changes,
                )
        h.slot.release()
        if event is not None:
            self._report(event)

    def _report(self, event: BreakerEvent) -> None:
        listener = self._listener
        if listener is None:
            return
        with self._report_lock:
            if self._reported.get(event.host, 0) >= event.seq:
                return  # a newer transition was reported already
            self._reported[event.host] = event.seq
            listener(event)

    def check(self, host: str, url: str) -> None:
        """Raise :class:`HostDeferred` when ``host``'s breaker is open (no state change)."""
        h = self._host(host)
        with self._lock:
            b = h.breaker
            if b.state is not BreakerState.OPEN:
                return
            assert b.opened_at is not None
            left = max(b.opened_at + b.cooldown - self._clock(), 0.0)
        raise self._defer(
            host,
            h,
            left,
            f"circuit open after {b.failures} failure(s) in a row (last: {b.last_error})",
            url,
        )

    def pause(self, host: str, seconds: float, reason: str) -> None:
        """Pause every request to ``host`` for ``seconds`` (the server asked for it)."""
        h = self._host(host)
        with self._lock:
            until = self._clock() + seconds
            h.throttled += 1
            if until > h.paused_until:
                h.paused_until = until
                h.pause_reason = reason

    def blocked(self, host: str) -> bool:
        """True when ``host`` has been down for ``patience`` seconds: its breaker is
        open, and opened again after a failed probe since. A run with nothing else to do
        can stop waiting for it."""
        with self._lock:
            h = self._hosts.get(host)
            if h is None:
                return False
            b = h.breaker
            return (
                b.state is BreakerState.OPEN
                and b.outage_probes > 0
                and b.down_since is not None
                and self._clock() - b.down_since >= self.patience
            )

    def reports(self) -> tuple[HostReport, ...]:
        """Every host whose breaker opened or that paused the run, sorted by host."""
        with self._lock:
            return tuple(
                HostReport(
                    host=host,
                    state=str(h.breaker.state),
                    opens=h.breaker.opens,
                    failed_probes=h.breaker.failed_probes,
                    failures=h.breaker.failures,
                    deferred=h.deferred,
                    throttled=h.throttled,
                    last_error=h.breaker.last_error,
                )
                for host, h in sorted(self._hosts.items())
                if h.breaker.opens or h.throttled or h.deferred
            )
