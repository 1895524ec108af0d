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

**Turns.** Every listening connection hears every notification, so with W idle worker
processes each announcement of one job used to wake all W, and all W ran a claim for it
(one won) on the same few cores: 16 workers on 2 cores took 14 ms to claim a job that one
worker alone claims in 2 (``bench/pickup.py``). Idle waiters of one set of kinds now take
turns across processes: a :class:`Turn` thread per process queues for a session-level
advisory lock (PostgreSQL grants it first come, first served), and only the process that
holds it acts on an announcement of a single job. Its waiter leaves to claim the job, the
process gives the turn up when the claim has ended (so that the next one cannot find the
job still eligible and run into the locked row), and the next process in the queue takes
it. An
announcement of several jobs in one transaction (``many``) still wakes every waiter.
Nothing is lost: a process that gains the turn after hearing an announcement reads the
queue before it sleeps again; a holder that dies releases the lock with its connection
(and a job whose announcement it took along is left to the safety-net poll); while a
turn's connection is down, its waiters act on every announcement, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence

import psycopg
from psycopg import pq

from impl.postgres import queries as q
from impl.postgres.channel import DUE_NOW, DUE_NOW_MANY

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
TURN_APPLICATION_NAME = "jobledger-turn"
"""What ``pg_stat_activity`` shows for a connection that holds or queues for a turn."""
TURN_GRACE = 0.05
"""Seconds a process keeps the turn after its last waiter timed out (it polls and comes
back)."""
TURN_ANSWER_WITHIN = 30.0
"""Seconds without an answer to a lock request (its ``lock_timeout`` is 10 s) after
which the turn's connection counts as dead."""
TURN_CLAIM_WAIT = 0.05
"""Seconds a process keeps the turn after its waiter left to claim, unless the claim
ends first (:meth:`Listener.claimed`)."""
FIRST_LISTEN_WAIT = 5.0
"""How long the first waiter waits for the listening connection before polling anyway."""


class Listener:
    """One ``LISTEN`` connection and its thread, shared by all waiters of one store."""

    def __init__(self, url: str, channel: str, *, connect_timeout: float) -> None:
        self.url = url
        self.channel = channel
        self.connect_timeout = connect_timeout
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._generation = 0
        self._heard: dict[str, int] = {}
        self._heard_many: dict[str, int] = {}
        self._reread = 0
        self._listening = False
        self._closing = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._turns: dict[tuple[str, ...] | None, Turn] = {}
        self.pid = os.getpid()
        """The process it listens for: a child of ``fork`` has no thread, and makes its own."""

    @property
    def generation(self) -> int:
        """Moves on every notification heard, and whenever listening starts or stops."""
        return self._generation

    @property
    def reread(self) -> int:
        """Moves when waiters must read the queue again: work announced for later, and
        listening started or stopped."""
        return self._reread

    @property
    def listening(self) -> bool:
        """True while the connection is up and ``LISTEN`` has been answered."""
        return self._listening

    def heard_since(self, seen: int, kinds: Sequence[str] | None, *, many: bool = False) -> bool:
        """True if work of one of ``kinds`` (None: any) due now was announced after
        generation ``seen`` (``many``: announced as several jobs in one transaction)."""
        heard = self._heard_many if many else self._heard
        with self._cond:
            if kinds is None:
                return any(at > seen for at in heard.values())
            return any(heard.get(kind, seen) > seen for kind in kinds)

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

    def turn(self, kinds: Sequence[str] | None) -> Turn:
        """The turn shared by this process's waiters for ``kinds`` (started on first use)."""
        key = None if kinds is None else tuple(sorted(set(kinds)))
        with self._cond:
            found = self._turns.get(key)
            if found is None:
                found = self._turns[key] = Turn(self, key)
            return found

    def wait_for(
        self,
        seen: int,
        kinds: Sequence[str] | None,
        turn: Turn | None,
        until: float,
        stop: threading.Event | None,
        *,
        reread: bool,
    ) -> str | None:
        """Sleep until this waiter should act: :data:`WORK` (work due now was announced
        after generation ``seen`` and it is this process's turn, or several jobs were
        announced at once), :data:`READ` (``reread``: the queue must be read again), or
        None when ``until`` passes or ``stop`` is set."""
        reread_seen = self._reread
        with self._cond:
            while not (stop is not None and stop.is_set()):
                if self.heard_since(seen, kinds, many=True):
                    return WORK
                if self.heard_since(seen, kinds):
                    if turn is None or not turn.working:
                        return WORK
                    if turn.leading:
                        # Heard before the turn came here: the process that gave it up
                        # has claimed since (it gives the turn up after its claim), or
                        # died; only a read tells.
                        return WORK if self.heard_since(turn.since, kinds) else READ
                if reread and self._reread != reread_seen:
                    return READ
                left = until - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, STOP_SLICE))
        return None

    def claimed(self) -> None:
        """A claim of this process has ended: a turn whose waiter left to make it goes on
        to the next process now (not earlier: that process would find the job still
        eligible until the claim commits, and its own claim would skip the locked row)."""
        with self._cond:
            if not self._turns:
                return
            now = time.monotonic()
            for turn in self._turns.values():
                if turn.waiters == 0 and turn._claiming and turn._give_at > now:
                    turn._give_at = now
                    turn._wake.notify_all()

    def close(self) -> None:
        """Stop listening, give up every turn and wait for the threads to end."""
        self._closing.set()
        with self._cond:
            turns = list(self._turns.values())
            self._cond.notify_all()
        for turn in turns:
            turn.close()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(LISTEN_SLICE + self.connect_timeout)

    def _moved(
        self, *, listening: bool | None = None, kind: str | None = None, many: bool = False
    ) -> None:
        with self._cond:
            if listening is not None:
                self._listening = listening
            self._generation += 1
            if kind is not None:
                self._heard[kind] = self._generation
                if many:
                    self._heard_many[kind] = self._generation
                elif self._turns and all(t.working and not t.leading for t in self._turns.values()):
                    # One job, and another process's turn: waking every waiter here
                    # only to find that out was the herd on few cores. What they heard
                    # is kept for when the turn comes here.
                    return
            else:
                self._reread += 1
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
        # On the socket, not ``conn.notifies()``: psycopg's wait wakes every 0.1 s to
        # look for a Ctrl-C, a quarter of an idle worker's CPU. What psycopg itself
        # reads (during the health check) reaches the same handler.
        conn.add_notify_handler(self._heard_one)
        pgconn = conn.pgconn
        checked = time.monotonic()
        while not self._closing.is_set():
            readable, _, _ = select.select([pgconn.socket], [], [], LISTEN_SLICE)
            if readable:
                pgconn.consume_input()  # a connection that died raises here
                while (heard := pgconn.notifies()) is not None:
                    self._heard_payload(heard.extra.decode("utf-8", "replace"))
            if time.monotonic() - checked >= HEALTH_CHECK_EVERY:
                conn.execute(q.HEALTH_CHECK)
                checked = time.monotonic()

    def _heard_one(self, heard: psycopg.Notify) -> None:
        self._heard_payload(heard.payload)

    def _heard_payload(self, payload: str) -> None:
        when, _, kind = payload.partition(":")
        if when in (DUE_NOW, DUE_NOW_MANY):
            self._moved(kind=kind, many=when == DUE_NOW_MANY)
        else:
            self._moved()  # DUE_LATER, or a payload of a newer version: read


WORK = "work"
""":meth:`Listener.wait_for`: claim now, without reading the queue first."""
READ = "read"
""":meth:`Listener.wait_for`: read when work is due, then decide."""


def turn_key(channel: str, kinds: tuple[str, ...] | None) -> int:
    """The advisory lock key of the turn of waiters for ``kinds`` on ``channel``: a
    signed 64-bit digest, so ledgers and sets of kinds take turns apart."""
    name = "jobledger-turn\0" + channel + "\0" + ("*" if kinds is None else "\0".join(kinds))
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Turn:
    """The right of one process's waiters for a set of kinds to act first on an
    announcement of a single job: a thread queues for an advisory lock on a connection of
    its own while the process has such waiters, and gives it up when it has none."""

    def __init__(self, listener: Listener, kinds: tuple[str, ...] | None) -> None:
        self.listener = listener
        self.key = turn_key(listener.channel, kinds)
        self.waiters = 0
        self.working = False
        """True while the connection is up: until then every waiter acts on everything."""
        self.leading = False
        """True while this process holds the turn."""
        self.since = 0
        """The listener's generation when the turn came to this process."""
        self.taken = 0
        """How many times this process has taken the turn (for tests and diagnostics)."""
        self._give_at = 0.0
        self._claiming = False
        """True when the last waiter left to claim announced work: the end of a claim
        hands the turn on only then (an idle worker's poll is a claim too, and the turn
        would change hands on every poll)."""
        self._wake = threading.Condition(listener._lock)
        """Wakes the thread (and only it) when waiters come and go."""
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._thread: threading.Thread | None = None

    def enter(self) -> None:
        """A waiter starts waiting (the thread starts on first use)."""
        cond = self.listener._cond
        with cond:
            self.waiters += 1
            if self._thread is None and not self.listener._closing.is_set():
                self._thread = threading.Thread(
                    target=self._run, name=f"jobledger-turn:{self.key}", daemon=True
                )
                self._thread.start()
            self._wake.notify_all()

    def leave(self, *, claiming: bool) -> None:
        """A waiter stops waiting: to claim announced work (the turn goes on when the
        claim ends) or for any other reason (the turn stays a moment for it to come
        back)."""
        cond = self.listener._cond
        with cond:
            self.waiters -= 1
            self._claiming = claiming
            self._give_at = time.monotonic() + (TURN_CLAIM_WAIT if claiming else TURN_GRACE)
            self._wake.notify_all()

    def close(self) -> None:
        """Stop the thread (its connection closes, which gives the turn up)."""
        with self._wake:
            self._wake.notify_all()
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.cancel()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(LISTEN_SLICE + self.listener.connect_timeout)

    def _set(self, *, working: bool | None = None, leading: bool) -> None:
        cond = self.listener._cond
        with cond:
            if working is not None:
                self.working = working
            if leading and not self.leading:
                self.since = self.listener._generation
                self.taken += 1
            self.leading = leading
            cond.notify_all()

    def _idle(self) -> bool:
        """Wait until this process has no waiter (for a grace after a timeout) or the
        listener closes; True when it closes."""
        closing = self.listener._closing
        with self._wake:
            while not closing.is_set():
                if self.waiters == 0:
                    left = self._give_at - time.monotonic()
                    if left <= 0:
                        return False
                    self._wake.wait(left)
                else:
                    self._wake.wait()
        return True

    def _take(self, conn: psycopg.Connection[tuple[object, ...]]) -> bool:
        """Queue for the lock: True once granted, False when ``lock_timeout`` ran out.

        Through libpq directly: psycopg's own wait wakes every 0.1 s to look for a
        Ctrl-C, and with one such thread queued in every idle process that was a sixth
        of an idle worker's CPU. This sleeps on the socket until the server answers
        (the grant, the lock timeout, or the cancel of :meth:`close`); no answer in
        ``TURN_ANSWER_WITHIN`` counts as a dead connection."""
        pgconn = conn.pgconn
        pgconn.send_query_params(q.TURN_TAKE, [str(self.key).encode()])
        while pgconn.flush():
            select.select([], [pgconn.socket], [], TURN_ANSWER_WITHIN)
        while True:
            pgconn.consume_input()
            if not pgconn.is_busy():
                break
            readable, _, _ = select.select([pgconn.socket], [], [], TURN_ANSWER_WITHIN)
            if not readable:
                raise psycopg.OperationalError(
                    f"no answer to a lock request in {TURN_ANSWER_WITHIN:g} s"
                )
        granted = True
        failed: str | None = None
        while (res := pgconn.get_result()) is not None:
            if res.status == pq.ExecStatus.FATAL_ERROR:
                if res.error_field(pq.DiagnosticField.SQLSTATE) == q.LOCK_NOT_AVAILABLE:
                    granted = False
                else:
                    failed = (res.error_message or b"").decode("utf-8", "replace")
        if failed is not None:
            raise psycopg.OperationalError(failed)
        return granted

    def _run(self) -> None:
        listener = self.listener
        closing = listener._closing
        pause = RECONNECT_FIRST
        while not closing.is_set():
            try:
                with psycopg.connect(
                    listener.url,
                    autocommit=True,
                    connect_timeout=max(1, round(listener.connect_timeout)),
                    application_name=TURN_APPLICATION_NAME,
                ) as conn:
                    conn.execute(q.TURN_LOCK_TIMEOUT)
                    self._conn = conn
                    self._set(working=True, leading=False)
                    pause = RECONNECT_FIRST
                    while True:
                        with self._wake:
                            self._wake.wait_for(lambda: self.waiters > 0 or closing.is_set())
                        if closing.is_set():
                            break
                        if not self._take(conn):
                            continue  # queued 10 s: look whether anyone here still waits
                        self._set(leading=True)
                        if self._idle():
                            break
                        self._set(leading=False)
                        conn.execute(q.TURN_GIVE, {"key": self.key})
            except Exception as exc:  # the turn must outlive whatever the driver raises
                if not closing.is_set():
                    log.warning(
                        "taking turns for new jobs on channel %r failed (%s); every idle "
                        "worker wakes on every announcement until it is back",
                        listener.channel,
                        str(exc).strip().splitlines()[0] if str(exc).strip() else exc,
                    )
            self._conn = None
            self._set(working=False, leading=False)
            if closing.wait(pause):
                break
            pause = min(pause * 2, RECONNECT_LONGEST)


def wait_for_work(
    listener: Listener,
    due_in: Callable[[], float | None],
    *,
    kinds: Sequence[str] | None,
    timeout: float,
    stop: threading.Event | None,
    turns: bool = True,
) -> bool:
    """True once ``due_in()`` (seconds until the first job is eligible, None for none)
    says a job is eligible, or work of ``kinds`` (None: any) was announced and it is this
    process's turn (see the module's docstring; ``turns=False``: always); False after
    ``timeout`` seconds or once ``stop`` is set.

    An announcement of work due now answers True without reading the queue again: with
    many idle workers on few cores, that read made every one of them a transaction
    slower to claim (16 workers on 2 cores: median pickup 16 ms with the read, see
    ``bench/pickup.py``). Work announced for later (a future ``run_at``, a release with
    a delay, a retry after a backoff) makes the waiter read when it is due instead."""
    listener.start()
    turn = listener.turn(kinds) if turns else None
    if turn is not None:
        turn.enter()
    claiming = False
    try:
        claiming = _wait(listener, due_in, turn, kinds=kinds, timeout=timeout, stop=stop)
        return claiming
    finally:
        if turn is not None:
            turn.leave(claiming=claiming)


def _wait(
    listener: Listener,
    due_in: Callable[[], float | None],
    turn: Turn | None,
    *,
    kinds: Sequence[str] | None,
    timeout: float,
    stop: threading.Event | None,
) -> bool:
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
        found = listener.wait_for(seen, kinds, turn, wake, stop, reread=True)
        if found == WORK:
            return True
        took = now - began
        if found == READ and took > SLOW_DUE_READ:
            # The read walks every unfinished job: not again on every announcement of
            # work for later, or an idle worker would spend a core on it. Work due now
            # still wakes it at once.
            calm = min(now + took * (1 / SLOW_READ_SHARE - 1), wake)
            if listener.wait_for(seen, kinds, turn, calm, stop, reread=False) == WORK:
                return True
