"""Waiting for work on PostgreSQL: ``LISTEN``/``NOTIFY``, with polling as the safety net.

Every transaction that can make a job eligible (``plan``, ``plan_many``, ``release``,
``retry``, a ``fail`` that retries later) sends ``pg_notify`` on the ledger's channel
(:func:`impl.postgres.channel.channel_of`) inside itself, so the notification is
delivered only if, and once, it commits (:meth:`impl.postgres.database.Tx.announce`).

Each store keeps one :class:`Listener`: a thread with a connection of its own (outside
the pool, ``application_name`` :data:`APPLICATION_NAME`) that ``LISTEN``\\ s and counts
what it hears in a *generation* number. A waiter notes the generation, then reads when
the first job becomes eligible, then sleeps until the generation moves, that time comes,
or its timeout passes: a notification that arrives after the read moves the generation,
so none is lost between the read and the sleep. A job planned with a future ``run_at``,
released with a delay or held by an expiring lease becomes eligible without any write;
the waiter's sleep ends at that time.

When the listening connection drops (a server restart, ``pg_terminate_backend``, a
network cut found by the periodic health check), the thread reconnects with backoff and
meanwhile waiters fall back to polling every :data:`DOWN_POLL` seconds. Reconnecting
moves the generation, because notifications sent while nobody listened are gone.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence

import psycopg

from impl.postgres import queries as q
from impl.postgres.channel import DUE_NOW

log = logging.getLogger("jobledger.worker")

APPLICATION_NAME = "jobledger-listener"
"""What ``pg_stat_activity`` shows for a listening connection."""
LISTEN_SLICE = 0.25
"""Seconds the listening thread blocks on its socket before it looks at its stop flag."""
HEALTH_CHECK_EVERY = 10.0
"""Seconds between two round trips on an idle listening connection, to find a dead one."""
RECONNECT_FIRST = 0.05
RECONNECT_LONGEST = 5.0
"""The pause before reconnecting starts at the first and doubles up to the longest."""
DOWN_POLL = 0.5
"""While nobody listens, waiters look at the queue this often (seconds)."""
SLOW_DUE_READ = 0.005
"""Seconds above which the read of when work is due counts as slow (many unfinished jobs)."""
SLOW_READ_SHARE = 0.1
"""After a slow read, the next waits so that such reads take at most this share of time."""
STOP_SLICE = 0.1
"""A waiter looks at its stop event at least this often (seconds)."""
FIRST_LISTEN_WAIT = 5.0
"""How long the first waiter waits for the listening connection before polling anyway."""


class Listener:
    """One ``LISTEN`` connection and its thread, shared by all waiters of one store."""

    def __init__(self, url: str, channel: str, *, connect_timeout: float) -> None:
        self.url = url
        self.channel = channel
        self.connect_timeout = connect_timeout
        self._cond = threading.Condition()
        self._generation = 0
        self._heard: dict[str, int] = {}
        self._listening = False
        self._closing = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.pid = os.getpid()
        """The process it listens for: a child of ``fork`` has no thread, and makes its own."""

    @property
    def generation(self) -> int:
        """Moves on every notification heard, and whenever listening starts or stops."""
        return self._generation

    @property
    def listening(self) -> bool:
        """True while the connection is up and ``LISTEN`` has been answered."""
        return self._listening

    def heard_since(self, seen: int, kinds: Sequence[str] | None) -> bool:
        """True if work of one of ``kinds`` (None: any) was announced after generation
        ``seen``."""
        with self._cond:
            if kinds is None:
                return any(at > seen for at in self._heard.values())
            return any(self._heard.get(kind, seen) > seen for kind in kinds)

    def start(self) -> None:
        """Start the thread once; the first call waits (a while) for it to listen."""
        with self._cond:
            if self._thread is not None or self._closing.is_set():
                return
            self._thread = threading.Thread(
                target=self._run, name=f"jobledger-listen:{self.channel}", daemon=True
            )
            self._thread.start()
        self._ready.wait(FIRST_LISTEN_WAIT)

    def wait_change(self, seen: int, until: float, stop: threading.Event | None) -> None:
        """Sleep until the generation is no longer ``seen``, ``time.monotonic()`` reaches
        ``until``, or ``stop`` is set."""
        with self._cond:
            while self._generation == seen and not (stop is not None and stop.is_set()):
                left = until - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(min(left, STOP_SLICE) if stop is not None else left)

    def wait_heard(
        self, kinds: Sequence[str] | None, until: float, stop: threading.Event | None
    ) -> None:
        """Sleep until work of ``kinds`` due now is announced, ``time.monotonic()``
        reaches ``until``, or ``stop`` is set."""
        seen = self._generation
        with self._cond:
            while not self.heard_since(seen, kinds) and not (stop is not None and stop.is_set()):
                left = until - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(min(left, STOP_SLICE))

    def close(self) -> None:
        """Stop listening and wait for the thread to end."""
        self._closing.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(LISTEN_SLICE + self.connect_timeout)

    def _moved(self, *, listening: bool | None = None, kind: str | None = None) -> None:
        with self._cond:
            if listening is not None:
                self._listening = listening
            self._generation += 1
            if kind is not None:
                self._heard[kind] = self._generation
            self._cond.notify_all()

    def _run(self) -> None:
        pause = RECONNECT_FIRST
        while not self._closing.is_set():
            try:
                with psycopg.connect(
                    self.url,
                    autocommit=True,
                    connect_timeout=max(1, round(self.connect_timeout)),
                    application_name=APPLICATION_NAME,
                ) as conn:
                    conn.execute(q.listen(self.channel))
                    self._moved(listening=True)
                    self._ready.set()
                    pause = RECONNECT_FIRST
                    self._listen(conn)
            except Exception as exc:  # the listener must outlive whatever the driver raises
                if not self._closing.is_set():
                    log.warning(
                        "listening for new jobs on channel %r failed (%s); idle workers "
                        "poll every %.1f s until it is back",
                        self.channel,
                        str(exc).strip().splitlines()[0] if str(exc).strip() else exc,
                        DOWN_POLL,
                    )
            if self._listening:
                self._moved(listening=False)
            self._ready.set()
            if self._closing.wait(pause):
                break
            pause = min(pause * 2, RECONNECT_LONGEST)

    def _listen(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        checked = time.monotonic()
        while not self._closing.is_set():
            for heard in conn.notifies(timeout=LISTEN_SLICE):
                when, _, kind = heard.payload.partition(":")
                self._moved(kind=kind if when == DUE_NOW else None)
            if time.monotonic() - checked >= HEALTH_CHECK_EVERY:
                conn.execute(q.HEALTH_CHECK)
                checked = time.monotonic()


def wait_for_work(
    listener: Listener,
    due_in: Callable[[], float | None],
    *,
    kinds: Sequence[str] | None,
    timeout: float,
    stop: threading.Event | None,
) -> bool:
    """True once ``due_in()`` (seconds until the first job is eligible, None for none)
    says a job is eligible, or work of ``kinds`` (None: any) was announced; False after
    ``timeout`` seconds or once ``stop`` is set.

    An announcement of work due now answers True without reading the queue again: with
    many idle workers on few cores, that read made every one of them a transaction
    slower to claim (16 workers on 2 cores: median pickup 16 ms with the read, see
    ``bench/pickup.py``). Work announced for later (a future ``run_at``, a release with
    a delay, a retry after a backoff) makes the waiter read when it is due instead."""
    listener.start()
    deadline = time.monotonic() + timeout
    while True:
        seen = listener.generation
        began = time.monotonic()
        due = due_in()
        now = time.monotonic()
        if due is not None and due <= 0:
            return True
        if now >= deadline or (stop is not None and stop.is_set()):
            return False
        wake = deadline if due is None else min(deadline, now + due)
        if not listener.listening:
            wake = min(wake, now + DOWN_POLL)
        listener.wait_change(seen, wake, stop)
        if listener.heard_since(seen, kinds):
            return True
        took = now - began
        if took > SLOW_DUE_READ and listener.generation != seen:
            # The read walks every unfinished job: not again on every announcement of
            # work for later, or an idle worker would spend a core on it. Work due now
            # still wakes it at once.
            calm = min(now + took * (1 / SLOW_READ_SHARE - 1), wake)
            listener.wait_heard(kinds, calm, stop)
            if listener.heard_since(seen, kinds):
                return True
