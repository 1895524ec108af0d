"""Waiting for a lock: jobledger's own busy handler, in place of SQLite's.

SQLite's busy handler sleeps 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50 and then 100 ms
between tries, for as long as the busy timeout allows. Several processes that share one
file make it unfair: the process that holds the write lock takes it again microseconds
after committing, while a process that lost a few times sleeps 100 ms at a go; measured
with 4 processes draining 3,000 jobs, two of them waited 830 ms for their first write and
the last process to see the queue empty did so 30-40 ms after the last job was done.

So every connection is opened with SQLite's busy timeout at 0 and whoever meets a busy
lock waits here instead: sleeps that start at :data:`FIRST_PAUSE`, double up to
:data:`LONGEST_PAUSE` and are jittered (waiters that met the lock together do not wake
together), until the configured ``busy_timeout`` has passed. Short sleeps are not better:
a waiter that takes the lock from a process that was about to take it again costs that
process a sleep and costs itself a reread of every cached page (SQLite drops a
connection's page cache whenever another connection committed), so waking every
50-200 us made 4 processes slower still. Nor is a short longest sleep: with dozens of
processes on one file every try that finds the lock taken costs CPU (SQLite's file locks,
the WAL index, ``lease_next``'s probe) that the process holding the lock then lacks. With
8 ms, 64 processes each doing one 20 ms effect per job tried ``BEGIN IMMEDIATE`` 7.5 times
per transaction and spent 4.8-6.8 ms of CPU per job; with 32 ms, 3.7-4.0 ms, and 20-60%
more jobs per second (+10-20% with 32 processes, unchanged with 8; one sitting,
alternating; ``bench/README.md``). A waiter reaches the longest sleep only after five
tries in a row found the lock taken.

A caller can also stop waiting early: ``lease_next`` asks, between two tries, whether
anything is eligible at all (a read, which never waits for the writer in WAL mode), and
returns None at once if not.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

FIRST_PAUSE = 0.001
"""Seconds of the first sleep after a busy lock (before jitter)."""

LONGEST_PAUSE = 0.032
"""The longest sleep between two tries (before jitter)."""

# Primary result codes (the low byte of an extended code), from sqlite3.h.
BUSY = 5
LOCKED = 6


def primary_code(exc: sqlite3.Error) -> int | None:
    """The primary result code of ``exc`` (the low byte of its extended code), if any."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def is_busy(exc: sqlite3.Error) -> bool:
    """True if ``exc`` says a lock was held by another connection (worth waiting for)."""
    return primary_code(exc) in (BUSY, LOCKED)


def patiently(timeout: float, attempt: Callable[[], T]) -> T:
    """Return ``attempt()``, tried again while it fails on a busy lock, for ``timeout``
    seconds from the first failure; then its last ``sqlite3`` error is raised.

    ``attempt`` must be safe to repeat after a busy error: a read, or a step that checks
    under the write lock what an earlier try may have done (opening, migrating).
    """
    deadline = None
    pause = FIRST_PAUSE
    while True:
        try:
            return attempt()
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + timeout
            if now >= deadline:
                raise
            time.sleep(min(deadline - now, pause * (0.5 + random.random())))
            pause = min(pause * 2, LONGEST_PAUSE)
