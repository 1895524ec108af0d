"""Proof that nothing blocks an event loop: asyncio's debug mode, told apart from a
starved machine by a canary thread.

asyncio's debug mode reports every callback that took longer than
``loop.slow_callback_duration`` ("Executing <...> took 0.3 seconds"). It measures wall
time, so on a loaded two-core machine a one-line asyncio-internal callback is reported
too when the OS did not schedule the loop's thread for a while (0.084 s in a quiet
conformance run, 0.329 s during the full suite). A blocking call and a starved thread are
told apart by a canary: a thread that wakes every :data:`TICK` seconds and notes how late
it woke. A call that blocks the loop (a sleep, a lock wait, a database round trip) releases
the GIL, so the canary keeps waking on time; when the whole process was starved, the
canary was late too. A report counts as a blocked loop unless the canary was late, within
the same window, by at least half the callback's duration; the others are kept as
``noise`` for the curious. ``tests/aio/test_effect.py`` checks the detector catches a
0.5 s ``time.sleep`` on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

SLOW_CALLBACK = 0.25
"""Seconds a loop callback may take before it is reported. 0.05 s flagged callbacks of 50
to 100 ms with two CPU burners running: each hands a step to the store's thread, whose
Python then holds the GIL, and on a starved machine the loop waits that long to get it
back (a cost of running the sync store on a thread, not a blocking call). 0.25 s stays
clear of that and still far below the forced blocks the tests use (0.5 s)."""

TICK = 0.01
"""Seconds between the canary's wake-ups."""


class LoopWatch(logging.Handler):
    """Collects asyncio's slow-callback reports and classifies them (see module doc)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._slow: list[tuple[float, float, str]] = []  # (reported at, took, message)
        self._late: list[tuple[float, float]] = []  # (woke at, lateness)
        self._stop = threading.Event()
        self._canary = threading.Thread(target=self._tick, name="loopwatch-canary", daemon=True)
        self._canary.start()
        logging.getLogger("asyncio").addHandler(self)
        self.noise: list[str] = []

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Put ``loop`` in debug mode with the small slow-callback threshold."""
        loop.set_debug(True)
        loop.slow_callback_duration = SLOW_CALLBACK

    def _tick(self) -> None:
        while True:
            before = time.monotonic()
            if self._stop.wait(TICK):
                return
            woke = time.monotonic()
            late = woke - before - TICK
            if late > TICK:
                self._late.append((woke, late))

    def emit(self, record: logging.LogRecord) -> None:
        """Keep a slow-callback report with its time and duration."""
        args = record.args
        if (
            isinstance(args, tuple)
            and len(args) == 2
            and isinstance(args[1], float)
            and str(record.msg).startswith("Executing")
        ):
            self._slow.append((time.monotonic(), args[1], record.getMessage()))

    def close(self) -> list[str]:  # type: ignore[override]
        """Stop watching; return the reports of a blocked loop (starvation filtered out)."""
        logging.getLogger("asyncio").removeHandler(self)
        time.sleep(2 * TICK)  # a canary late for the last report wakes meanwhile
        self._stop.set()
        self._canary.join()
        super().close()
        blocked = []
        for at, took, message in self._slow:
            starved = max(
                (late for woke, late in self._late if at - took <= woke <= at + took + TICK),
                default=0.0,
            )
            (self.noise if starved >= took / 2 else blocked).append(message)
        return blocked
