"""Clocks: where every store reads the time.

A clock is any zero-argument callable returning seconds as a float. Production uses the
wall clock (or, on PostgreSQL, the server's); tests inject a :class:`ManualClock` so that
lease expiry is decided by the test, not by the scheduler.
"""

from __future__ import annotations

import time
from typing import Protocol

from attrs import define


class Clock(Protocol):
    """A source of the current time in seconds."""

    def __call__(self) -> float:
        """Return the current time in seconds."""
        ...


def wall_clock() -> float:
    """Return the wall-clock time in seconds since the epoch."""
    return time.time()


@define
class ManualClock:
    """A clock that moves only when told to; for tests and simulations."""

    now: float = 1_000_000.0

    def __call__(self) -> float:
        """Return the current simulated time."""
        return self.now

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds`` (never backwards) and return the new time."""
        if seconds < 0:
            raise ValueError(f"a clock only moves forward; got a step of {seconds} s")
        self.now += seconds
        return self.now
