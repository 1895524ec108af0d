"""Pacing a long maintenance task (prune, vacuum) beside workers: steps sized to a time
budget, and a pause after each step in proportion to it.

A prune that takes the write lock again as soon as it let it go starves the workers:
SQLite's lock is not fair across processes (a waiter sleeps between tries, the prune
does not), and every prune commit makes each worker reread the pages it had cached.
Measured here with one worker beside a prune of 30,000 jobs in batches of 200 that each
held the lock about 14 ms and then left it free for as long: the worker ran at 0.2-0.26x
of its speed alone. So a :class:`Pacer`

- sizes each step from the last one's measured time (``items / seconds``), aiming at
  :data:`AIM` of the ``budget`` so that a step that runs slower than the last stays under
  it, never more than ``limit`` items nor fewer than ``floor``, and never growing more
  than twofold at once (a caller whose steps must keep their size, as a prune's batches
  must, passes ``floor = limit``);
- after each step, sleeps until the task has held at most ``share`` of the time since it
  began that step (a step of ``t`` seconds is followed by ``t * (1 - share) / share``,
  at most :data:`LONGEST_PAUSE`).

Each step's time and size are kept in :attr:`Pacer.steps` (the trace the tests read).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from attrs import define, field

HOLD_BUDGET = 0.04
"""Seconds a maintenance step may hold the write lock (the issue's limit is 50 ms)."""
AIM = 0.5
"""The fraction of the budget a step is sized for: room for a step that runs slower."""
SHARE = 0.3
"""The largest fraction of the time a paced task holds the lock (pauses fill the rest)."""
LONGEST_PAUSE = 1.0
"""The longest pause (seconds) after one step (a step that held the lock longer than
about 0.4 s, e.g. an archive on a slow disk, gets a shorter pause than its share asks)."""


@define
class Step:
    """One paced step: how many items it did, and how long it held the lock."""

    items: int
    seconds: float
    pause: float


@define
class Pacer:
    """Sizes and paces the steps of one maintenance task (see the module docstring).

    Args:
        limit: the most items one step may take (the caller's batch size, at least 1:
            ``model.retention.check_batch_size`` checks it).
        budget: seconds one step may hold the lock.
        share: the largest fraction of the time the task holds the lock.
        first: the first step's size (None: ``limit``).
        floor: the fewest items a step is sized to (``limit``: every step takes ``limit``).
        monotonic, sleep: the clock and the sleep (tests pass their own).
    """

    limit: int
    budget: float = HOLD_BUDGET
    share: float = SHARE
    first: int | None = None
    floor: int = 1
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    steps: list[Step] = field(factory=list)
    _size: int = field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self._size = min(self.limit, self.first) if self.first else self.limit

    @property
    def size(self) -> int:
        """The number of items the next step should take."""
        return self._size

    def start(self) -> float:
        """The clock's reading when a step begins holding the lock."""
        return self.monotonic()

    def done(self, started: float, items: int) -> None:
        """Note a step that began holding the lock at ``started`` and did ``items``; size
        the next one, then pause."""
        seconds = max(self.monotonic() - started, 0.0)
        if items > 0 and seconds > 0:
            fitting = int(items * self.budget * AIM / seconds)
            self._size = max(self.floor, 1, min(self.limit, 2 * items, fitting))
        pause = min(seconds * (1.0 - self.share) / self.share, LONGEST_PAUSE)
        self.steps.append(Step(items=items, seconds=seconds, pause=pause))
        if pause > 0:
            self.sleep(pause)
