"""Pickup without polling delay: an idle Worker starts a job planned into an idle system
without waiting for its poll interval, also a job that only becomes due later, and on
PostgreSQL also after its listening connection was killed.

Every worker here polls every 30 s, and each test waits at most 10 s for what it
expects, so a test can only pass through the store's own wake-up (a notification, a
change check, or the wait's own due time), never through the safety-net poll.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import impl
from model import Config, Store, Workflow

FLOW = Workflow("flow", ["A", "B"], [("A", "B")], initial="A", terminal=["B"])
POLL = 30.0
"""The safety-net poll of every worker in this file: far longer than any wait below."""
WATCHDOG = 10.0


class Running:
    """A Worker running in a thread, and the jobs its handler started, in order."""

    def __init__(self, store: Store) -> None:
        self.started: list[str] = []
        self._cond = threading.Condition()

        def handler(ctx: impl.JobContext) -> None:
            with self._cond:
                self.started.append(str(ctx.identity["n"]))
                self._cond.notify_all()
            ctx.advance("B")

        self.worker = impl.Worker(store, {"flow": handler}, idle_poll=POLL)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()

    def wait_started(self, count: int) -> bool:
        """Wait (at most WATCHDOG s) until ``count`` jobs have started."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.started) >= count, WATCHDOG)

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(WATCHDOG)
        assert not self.thread.is_alive(), "stop() did not end the idle wait"


def _settle() -> None:
    """Give the worker time to go from its last job into its idle wait. (If it has not
    yet, the next job is leased by its poll right away: the test still passes, but
    proves less; 0.3 s is plenty on a loaded machine.)"""
    time.sleep(0.3)


def _sqlite(tmp_path: Path) -> Iterator[Callable[[], Store]]:
    from impl.sqlite.store import SqliteStore

    opened: list[Store] = []

    def make() -> Store:
        opened.append(SqliteStore(tmp_path / "j.sqlite"))
        return opened[-1]

    yield make
    for store in opened:
        store.close()


def _postgres() -> Iterator[Callable[[], Store]]:
    from tests.pg import postgres_factory, require_postgres

    require_postgres()
    inner, cleanup = postgres_factory(None)  # type: ignore[arg-type]
    opened: list[Store] = []

    def make() -> Store:
        # The server's clock: the worker's waits are real time.
        opened.append(inner(config=Config()))
        return opened[-1]

    yield make
    for store in opened:
        store.close()
    cleanup()


@pytest.fixture(params=["sqlite", "postgres"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """Opens handles on one real database (each call a new store, as a second process)."""
    if request.param == "sqlite":
        yield from _sqlite(tmp_path)
    else:
        yield from _postgres()


def test_a_plan_into_an_idle_system_is_picked_up_without_the_poll(
    stores: Callable[[], Store],
) -> None:
    worker_store, planner = stores(), stores()
    worker_store.register(FLOW)
    running = Running(worker_store)
    try:
        planner.plan("flow", {"n": 1})
        assert running.wait_started(1)
        _settle()
        planner.plan("flow", {"n": 2})
        assert running.wait_started(2), "the idle worker slept through the plan"
        _settle()
        planner.plan_many("flow", [{"n": 3}, {"n": 4}])
        assert running.wait_started(4), "the idle worker slept through plan_many"
    finally:
        running.stop()
    assert running.started == ["1", "2", "3", "4"]


def test_a_job_planned_for_later_is_picked_up_when_due(stores: Callable[[], Store]) -> None:
    worker_store, planner = stores(), stores()
    worker_store.register(FLOW)
    running = Running(worker_store)
    try:
        _settle()
        planner.plan("flow", {"n": "later"}, run_at=planner.now() + 1.0)
        planner.plan("flow", {"n": "now"})
        assert running.wait_started(1)
        assert running.started == ["now"]
        assert running.wait_started(2), "the worker did not wake when the job came due"
    finally:
        running.stop()
    assert running.started == ["now", "later"]


def test_a_job_released_with_a_delay_is_picked_up_when_due(stores: Callable[[], Store]) -> None:
    worker_store, other = stores(), stores()
    worker_store.register(FLOW)
    other.plan("flow", {"n": "back"})
    lease = other.lease_next("elsewhere")
    assert lease is not None
    running = Running(worker_store)
    try:
        _settle()
        other.release(lease, delay=1.0)
        assert running.wait_started(1), "the worker did not wake when the release came due"
    finally:
        running.stop()
    assert running.started == ["back"]


@pytest.mark.xdist_group("processes")
def test_the_postgres_listener_survives_its_connection_being_terminated() -> None:
    """pg_terminate_backend on the listening connection: meanwhile the worker polls (so
    a job planned then is still started), and the listener reconnects (so a job planned
    afterwards is started at once again)."""
    import psycopg

    from impl.postgres.pickup import APPLICATION_NAME
    from tests.pg import PG_URL

    it = _postgres()
    stores = next(it)
    try:
        worker_store, planner = stores(), stores()
        worker_store.register(FLOW)
        running = Running(worker_store)
        try:
            with psycopg.connect(PG_URL, autocommit=True) as admin:

                def listeners() -> set[int]:
                    rows = admin.execute(
                        "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                        "AND query LIKE %s",
                        (APPLICATION_NAME, f"%{worker_store._db.channel}%"),  # type: ignore[attr-defined]
                    ).fetchall()
                    return {int(r[0]) for r in rows}

                first = _until(listeners)
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", (list(first),)
                )
                planner.plan("flow", {"n": 1})
                assert running.wait_started(1), "no polling while the listener was down"
                second = _until(lambda: listeners() - first)
                assert second, "the listener did not reconnect"
                _settle()
                planner.plan("flow", {"n": 2})
                assert running.wait_started(2), "the reconnected listener heard nothing"
        finally:
            running.stop()
        assert running.started == ["1", "2"]
    finally:
        for _ in it:
            pass


def _until(probe: Callable[[], set[int]]) -> set[int]:
    """Call ``probe`` until it returns a non-empty set (at most WATCHDOG s)."""
    deadline = time.monotonic() + WATCHDOG
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.05)
    return set()


def _watch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "jobledger-watch:shared.sqlite"]


def test_sqlite_waiters_share_one_watching_thread_that_ends_when_nobody_waits(
    tmp_path: Path,
) -> None:
    """Idle cost per process, not per handler thread: four idle handler threads, one
    thread looking for commits; it ends once nobody has waited for a while."""
    from impl.sqlite import pickup
    from impl.sqlite.store import SqliteStore

    db = tmp_path / "shared.sqlite"
    with SqliteStore(db) as store, SqliteStore(db) as planner:
        store.register(FLOW)
        started: list[str] = []
        done = threading.Event()

        def handler(ctx: impl.JobContext) -> None:
            started.append(str(ctx.identity["n"]))
            ctx.advance("B")
            done.set()

        worker = impl.Worker(store, {"flow": handler}, idle_poll=POLL, concurrency=4)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        try:
            _settle()
            assert len(_watch_threads()) == 1
            planner.plan("flow", {"n": 1})
            assert done.wait(WATCHDOG), "the idle handler threads slept through the plan"
        finally:
            worker.stop()
            thread.join(WATCHDOG)
        assert started == ["1"]
        deadline = time.monotonic() + pickup.IDLE_GRACE + WATCHDOG
        while _watch_threads() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _watch_threads() == [], "the watching thread outlived its waiters"


def test_a_slow_read_of_when_work_is_due_is_not_repeated_on_every_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With many jobs planned for later the read walks them all (40 ms for 100,000):
    an idle waiter must not repeat it on every commit of a busy ledger. Here the read is
    made slow (50 ms) and another connection commits every 5 ms for the whole wait."""
    from impl.sqlite import pickup
    from impl.sqlite.store import SqliteStore

    reads: list[float] = []
    real = pickup._due_in

    def slow(*args: object) -> float | None:
        time.sleep(0.05)
        reads.append(time.monotonic())
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(pickup, "_due_in", slow)
    db = tmp_path / "j.sqlite"
    with SqliteStore(db) as store, SqliteStore(db) as planner:
        store.register(FLOW)
        later = planner.now() + 3600
        busy = threading.Event()

        def commit_often() -> None:
            n = 0
            while not busy.is_set():
                planner.plan("flow", {"n": n}, run_at=later)
                n += 1
                time.sleep(0.005)

        committer = threading.Thread(target=commit_often, daemon=True)
        committer.start()
        try:
            assert store.wait_for_work(1.0) is False
        finally:
            busy.set()
            committer.join(WATCHDOG)
    # Back to back, 50 ms reads over 1 s make about 18; at most a tenth of the time
    # spent reading allows 2 or 3.
    assert len(reads) <= 5, f"{len(reads)} slow reads in one second of waiting"


def test_a_slow_postgres_read_is_not_repeated_on_every_announcement_for_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same on PostgreSQL, where jobs planned for later are announced as such (a
    waiter must read when they are due) while jobs due now wake it without a read."""
    from impl.postgres import read

    reads: list[float] = []
    real = read.due_in

    def slow(*args: object) -> float | None:
        time.sleep(0.05)
        reads.append(time.monotonic())
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(read, "due_in", slow)
    it = _postgres()
    stores = next(it)
    try:
        store, planner = stores(), stores()
        store.register(FLOW)
        later = planner.now() + 3600
        busy = threading.Event()

        def commit_often() -> None:
            n = 0
            while not busy.is_set():
                planner.plan("flow", {"n": n}, run_at=later)
                n += 1
                time.sleep(0.005)

        committer = threading.Thread(target=commit_often, daemon=True)
        committer.start()
        try:
            assert store.wait_for_work(1.0) is False
        finally:
            busy.set()
            committer.join(WATCHDOG)
    finally:
        for _ in it:
            pass
    assert len(reads) <= 5, f"{len(reads)} slow reads in one second of waiting"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
def test_a_sqlite_commit_wakes_the_idle_watch_without_any_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watch sleeps on the WAL's writes: with every poll an hour apart (the watch's
    and the worker's), a plan is still picked up, woken by the write alone."""
    from impl.sqlite import pickup
    from impl.sqlite.store import SqliteStore

    monkeypatch.setattr(pickup, "FALLBACK_INTERVAL", 3600.0)
    monkeypatch.setattr(pickup, "CHANGE_CHECK_INTERVAL", 3600.0)
    db = tmp_path / "events.sqlite"
    with SqliteStore(db) as store, SqliteStore(db) as planner:
        store.register(FLOW)
        done = threading.Event()

        def handler(ctx: impl.JobContext) -> None:
            ctx.advance("B")
            done.set()

        worker = impl.Worker(store, {"flow": handler}, idle_poll=3600.0)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        try:
            _settle()
            planner.plan("flow", {"n": 1})
            assert done.wait(WATCHDOG), "the idle watch slept through the WAL's write"
        finally:
            worker.stop()
            thread.join(WATCHDOG)
        assert not thread.is_alive()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
def test_wal_writes_wake_on_a_write_and_on_wake_only(tmp_path: Path) -> None:
    from impl.sqlite.pickup import WalWrites

    wal = tmp_path / "x.sqlite-wal"
    wal.write_bytes(b"")
    writes = WalWrites(wal)
    try:
        assert writes.wait(0) is False
        with wal.open("ab") as f:
            f.write(b"frame")
        assert writes.wait(WATCHDOG) is True
        assert writes.wait(0) is False, "the events of one write were all read"
        writes.wake()
        assert writes.wait(WATCHDOG) is False
    finally:
        writes.close()
    with pytest.raises(OSError):
        WalWrites(tmp_path / "missing.sqlite-wal")


# -- PostgreSQL: idle processes take turns on announcements of single jobs --------------


def test_a_second_job_of_a_kind_in_one_transaction_is_announced_as_many() -> None:
    from impl.postgres.channel import payload_after

    sent: set[str] = set()
    for later, expected in [
        (False, "now:flow"),
        (False, "many:flow"),
        (False, None),
        (True, "later:flow"),
        (True, None),
    ]:
        payload = payload_after(sent, "flow", later=later)
        assert payload == expected
        if payload is not None:
            sent.add(payload)
    assert payload_after(sent, "other", later=False) == "now:other"


class _Waiter:
    """``store.wait_for_work`` in a thread, counting the store's reads of the queue."""

    def __init__(self, store: Store, reads: list[object]) -> None:
        self.store = store
        self.reads = reads
        self.result: list[bool] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.result.append(self.store.wait_for_work(POLL, kinds=["flow"], stop=self.stop))

    def turn(self) -> object:
        listener = _until_value(lambda: self.store._listener)  # type: ignore[attr-defined]
        return _until_value(lambda: listener._turns.get(("flow",)))

    def finish(self) -> bool:
        self.thread.join(WATCHDOG)
        assert not self.thread.is_alive(), "the waiter did not wake"
        return self.result[0]


def _until_value(probe: Callable[[], object]) -> object:
    deadline = time.monotonic() + WATCHDOG
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.01)
    raise AssertionError("never came")


def _counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    from impl.postgres import read

    reads: list[object] = []
    real = read.due_in

    def counted(*args: object) -> float | None:
        reads.append(args)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(read, "due_in", counted)
    return reads


def test_a_single_job_wakes_only_the_turn_holder_and_a_dead_holder_passes_the_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another session (here the test's own connection) holds the turn: a job planned
    alone does not wake this store's waiter. When that session dies without claiming
    the job, the turn comes here, and the waiter reads the queue (a second read; a
    wake-up on the announcement itself claims without reading) and wakes."""
    import psycopg

    from impl.postgres.pickup import turn_key
    from tests.pg import PG_URL

    reads = _counting_reads(monkeypatch)
    it = _postgres()
    stores = next(it)
    try:
        store, planner = stores(), stores()
        store.register(FLOW)
        holder = psycopg.connect(PG_URL, autocommit=True)
        try:
            key = turn_key(store._db.channel, ("flow",))  # type: ignore[attr-defined]
            holder.execute("SELECT pg_advisory_lock(%s)", (key,))
            waiter = _Waiter(store, reads)
            turn = waiter.turn()
            _until_value(lambda: turn.working and turn.waiters == 1)  # type: ignore[attr-defined]
            assert len(reads) == 1
            planner.plan("flow", {"n": 1})
            listener = store._listener  # type: ignore[attr-defined]
            _until_value(lambda: listener._heard.get("flow"))
            assert waiter.thread.is_alive()
            assert len(reads) == 1
        finally:
            holder.close()  # the holder dies with the announcement it heard
        assert waiter.finish() is True
        assert turn.taken == 1  # type: ignore[attr-defined]
        assert len(reads) == 2, "woke on an announcement while another process had the turn"
    finally:
        for _ in it:
            pass


def test_several_jobs_in_one_transaction_wake_every_waiter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import psycopg

    from impl.postgres.pickup import turn_key
    from tests.pg import PG_URL

    reads = _counting_reads(monkeypatch)
    it = _postgres()
    stores = next(it)
    try:
        store, planner = stores(), stores()
        store.register(FLOW)
        with psycopg.connect(PG_URL, autocommit=True) as holder:
            key = turn_key(store._db.channel, ("flow",))  # type: ignore[attr-defined]
            holder.execute("SELECT pg_advisory_lock(%s)", (key,))
            waiter = _Waiter(store, reads)
            turn = waiter.turn()
            _until_value(lambda: turn.working and turn.waiters == 1)  # type: ignore[attr-defined]
            planner.plan_many("flow", [{"n": 1}, {"n": 2}])
            assert waiter.finish() is True
            assert turn.taken == 0  # type: ignore[attr-defined]
            assert len(reads) == 1, "the waiter read the queue instead of claiming"
    finally:
        for _ in it:
            pass


def test_the_turn_goes_to_the_next_process_once_its_holder_has_claimed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads = _counting_reads(monkeypatch)
    it = _postgres()
    stores = next(it)
    try:
        first, second, planner = stores(), stores(), stores()
        first.register(FLOW)
        a = _Waiter(first, [])
        turn_a = a.turn()
        _until_value(lambda: turn_a.leading)  # type: ignore[attr-defined]
        b = _Waiter(second, reads)
        turn_b = b.turn()
        _until_value(lambda: turn_b.working and turn_b.waiters == 1)  # type: ignore[attr-defined]
        assert not turn_b.leading  # type: ignore[attr-defined]
        assert len(reads) == 2  # each waiter's first
        planner.plan("flow", {"n": 1})
        assert a.finish() is True
        assert first.lease_next("w", kinds=["flow"]) is not None
        _until_value(lambda: turn_b.leading)  # type: ignore[attr-defined]
        assert not turn_a.leading  # type: ignore[attr-defined]
        # b heard the job before the turn came: it read the queue, after the claim.
        _until_value(lambda: len(reads) == 3)
        b.stop.set()
        assert b.finish() is False
    finally:
        for _ in it:
            pass


def test_while_the_turn_cannot_be_taken_every_waiter_acts_on_every_announcement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The turn's connection fails (here its first statement): its waiters must not
    wait for a turn that never comes."""
    from impl.postgres import queries

    monkeypatch.setattr(queries, "TURN_LOCK_TIMEOUT", "SELECT no_such_function()")
    reads = _counting_reads(monkeypatch)
    it = _postgres()
    stores = next(it)
    try:
        store, planner = stores(), stores()
        store.register(FLOW)
        waiter = _Waiter(store, reads)
        turn = waiter.turn()
        _until_value(lambda: turn.waiters == 1)  # type: ignore[attr-defined]
        planner.plan("flow", {"n": 1})
        assert waiter.finish() is True
        assert not turn.working
        assert turn.taken == 0
        assert len(reads) == 1
    finally:
        for _ in it:
            pass
