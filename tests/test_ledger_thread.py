"""Issue 15, threads: a worker's idle threads take turns looking for work, and with
``ledger_threads=1`` every ledger call of its handler threads is made on one thread
(impl.ledgerthread), with ``fn`` still in the handler thread and errors raised where
the call was made."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import impl
from impl import failpoint, telemetry, worker
from impl.ledgerthread import LedgerThread, threaded
from impl.sqlite.store import SqliteStore
from model import Config, Event, HistoryEvent, MemoryStore, Workflow
from model.errors import LeaseLost

FLOW = Workflow("flow", ["A", "B", "C"], [("A", "B"), ("B", "C")], initial="A", terminal=["C"])


class Recording:
    """A store that records which thread made each call, and how many claims found none."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.threads: Counter[tuple[str, str]] = Counter()
        self.empty: list[str] = []
        self.lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr) or name in ("workflow", "now"):
            return attr

        def call(*args: object, **kwargs: object) -> object:
            who = threading.current_thread().name
            result = attr(*args, **kwargs)
            with self.lock:
                self.threads[(name, who)] += 1
                if name == "lease_next" and result is None:
                    self.empty.append(who)
            return result

        return call

    @property
    def config(self) -> Config:
        return self._store.config  # type: ignore[no-any-return]


# -- idle threads take turns ----------------------------------------------------------


def test_idle_threads_of_a_worker_run_until_idle_look_for_work_one_at_a_time(
    tmp_path: Path,
) -> None:
    """Fifteen of sixteen threads find nothing while one job runs: after their first
    look, one of them looks again each ``idle_poll`` while the others sleep (before,
    all fifteen looked every ``idle_poll``, each taking the write lock to find nothing,
    and the last jobs' own transactions queued behind them)."""
    inner = SqliteStore(tmp_path / "j.sqlite", config=Config(lease_ttl=30.0))
    inner.register(FLOW)
    inner.plan("flow", {"n": 1})
    store = Recording(inner)
    enough = threading.Event()

    def handler(ctx: impl.JobContext) -> None:
        # Runs until 40 empty looks were made (or 30 s, which fails below).
        for _ in range(3000):
            with store.lock:
                if len(store.empty) >= 40:
                    break
            enough.wait(0.01)
        ctx.advance("B")
        ctx.advance("C")

    report = impl.Worker(store, {"flow": handler}, concurrency=16, idle_poll=0.005).run(  # type: ignore[arg-type]
        until_idle=True
    )
    assert report.finished == 1
    assert len(store.empty) >= 40
    # The last ten looks before the job ended came from one thread (two if the turn
    # passed meanwhile); fifteen threads each looking on their own would spread them.
    assert len(set(store.empty[30:40])) <= 2, store.empty
    inner.close()


def test_stopping_wakes_the_idle_threads_that_sleep_while_another_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sleepers' own wait is only a safety net (here an hour): ``stop`` wakes them."""
    monkeypatch.setattr(worker, "IDLE_SLEEPER_WAIT", 3600.0)
    store = SqliteStore(tmp_path / "j.sqlite", config=Config(lease_ttl=30.0))
    store.register(FLOW)
    store.plan("flow", {"n": 1})
    w: impl.Worker

    def handler(ctx: impl.JobContext) -> None:
        threading.Timer(0.3, w.stop).start()
        ctx.effect("wait", lambda _e: threading.Event().wait(0.6))
        ctx.advance("B")  # StopRequested: the lease is released

    w = impl.Worker(store, {"flow": handler}, concurrency=8, idle_poll=0.01)
    done: list[impl.RunReport] = []
    runner = threading.Thread(target=lambda: done.append(w.run(until_idle=True)))
    runner.start()
    runner.join(60)
    assert not runner.is_alive(), "idle threads slept through the stop"
    assert done[0].released == 1
    store.close()


# -- the ledger thread ----------------------------------------------------------------


def test_every_ledger_call_of_the_handler_threads_runs_on_one_thread(tmp_path: Path) -> None:
    inner = SqliteStore(tmp_path / "j.sqlite", config=Config(lease_ttl=30.0))
    inner.register(FLOW)
    ids = inner.plan_many("flow", [{"n": i} for i in range(40)])
    store = Recording(inner)
    ran_in: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def handler(ctx: impl.JobContext) -> None:
        def fn(e: impl.EffectContext) -> dict[str, int]:
            with lock:
                ran_in[threading.current_thread().name] += 1
            return {"token": e.token}

        with lock:
            seen[ctx.job_id] += 1
        assert ctx.effect("work", fn) == {"token": ctx.lease.token}
        ctx.advance("B")
        ctx.advance("C")

    w = impl.Worker(store, {"flow": handler}, concurrency=8, ledger_threads=1)  # type: ignore[arg-type]
    before = threading.active_count()
    report = w.run(until_idle=True)
    assert report.finished == 40
    assert set(seen) == set(ids)
    assert max(seen.values()) == 1
    assert {inner.state(j) for j in ids} == {"C"}
    assert {who for (_name, who) in store.threads} == {"ledger"}, store.threads
    # fn ran in the handler threads, never on the ledger thread.
    assert all(name.startswith("worker-") for name in ran_in)
    assert sum(ran_in.values()) == 40
    # The ledger thread left with the run.
    assert threading.active_count() == before
    inner.close()


def test_errors_of_a_call_on_the_ledger_thread_are_raised_in_its_caller(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "j.sqlite", config=Config(lease_ttl=30.0))
    store.register(FLOW)
    store.plan("flow", {"n": 1})
    thread = LedgerThread()
    calls = threaded(store, thread)
    try:
        lease = calls.lease_next("w")
        assert lease is not None
        stale = calls.renew(lease)
        calls.release(stale)
        with pytest.raises(LeaseLost):
            calls.advance(stale, "B")  # fenced: the lease was released

        again = calls.lease_next("w")
        assert again is not None

        def boom(_e: impl.EffectContext) -> None:
            raise RuntimeError("fn failed")

        with pytest.raises(RuntimeError, match="fn failed"):
            calls.run_effect(again, "op", boom)
        # fn's exception removed the start: nothing recorded, the op may run again.
        assert store.effects(again.job_id) == []
        assert calls.run_effect(again, "op", lambda _e: 7) == 7
        assert calls.run_effect(again, "op", lambda _e: 8) == 7  # replayed, fn not run
    finally:
        thread.close()
        store.close()
    with pytest.raises(impl.StorageError, match="closed"):
        calls.lease_next("w")


@pytest.mark.parametrize("point", failpoint.LEDGER_THREAD_POINTS)
def test_a_crash_on_the_ledger_thread_reaches_the_caller(point: str) -> None:
    """A crash before the call leaves nothing of it; after it, all of it (the caller is
    not told). The caller's thread gets the ``Crash`` either way."""
    store = MemoryStore()
    store.register(FLOW)
    job = store.plan("flow", {"n": 1})
    lease = store.lease_next("w")
    assert lease is not None
    thread = LedgerThread()
    failpoint.arm(point)
    try:
        with pytest.raises(failpoint.Crash):
            threaded(store, thread).advance(lease, "B")
    finally:
        failpoint.disarm_all()
        thread.close()
    assert store.state(job) == ("A" if point.endswith("before_call") else "B")


def test_a_worker_with_a_ledger_thread_fails_a_job_whose_handler_raised(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "j.sqlite", config=Config(lease_ttl=30.0, max_attempts=1))
    store.register(FLOW)
    job = store.plan("flow", {"n": 1})

    def handler(ctx: impl.JobContext) -> None:
        ctx.advance("B")
        raise ValueError("broken")

    report = impl.Worker(store, {"flow": handler}, concurrency=2, ledger_threads=1).run(
        until_idle=True
    )
    assert report.failed == 1
    assert store.state(job) == FLOW.failed
    store.close()


def test_by_default_a_threaded_worker_on_sqlite_calls_the_ledger_on_one_thread(
    tmp_path: Path,
) -> None:
    """SQLite admits one writer: a worker with several handler threads funnels its calls
    through one ledger thread unless told otherwise; one handler thread, another store,
    or an explicit count keeps what it asks."""
    inner = SqliteStore(tmp_path / "j.sqlite")
    inner.register(FLOW)
    inner.plan_many("flow", [{"n": i} for i in range(12)])
    store = Recording(inner)

    def handler(ctx: impl.JobContext) -> None:
        ctx.effect("work", lambda e: {"token": e.token})
        ctx.advance("B")
        ctx.advance("C")

    w = impl.Worker(store, {"flow": handler}, concurrency=4)  # type: ignore[arg-type]
    assert w.ledger_threads == 1
    assert w.run(until_idle=True).finished == 12
    assert {who for (_name, who) in store.threads} == {"ledger"}, store.threads

    assert impl.Worker(inner, {"flow": handler}).ledger_threads == 0
    assert (
        impl.Worker(inner, {"flow": handler}, concurrency=4, ledger_threads=0).ledger_threads == 0
    )
    assert (
        impl.Worker(inner, {"flow": handler}, concurrency=4, ledger_threads=2).ledger_threads == 2
    )
    memory = MemoryStore()
    memory.register(FLOW)
    assert impl.Worker(memory, {"flow": handler}, concurrency=4).ledger_threads == 0
    inner.close()
    with SqliteStore(tmp_path / "j.sqlite", config=Config(sqlite_group_window=0.001)) as grouped:
        assert impl.Worker(grouped, {"flow": handler}, concurrency=4).ledger_threads == 0


def test_ledger_threads_must_be_a_count(tmp_path: Path) -> None:
    store = MemoryStore()
    store.register(FLOW)
    for bad in (-1, True, 1.5, "2"):
        with pytest.raises(impl.InvalidInput, match="ledger_threads"):
            impl.Worker(store, {"flow": lambda ctx: None}, ledger_threads=bad)  # type: ignore[arg-type]


def test_several_ledger_threads_share_the_calls(tmp_path: Path) -> None:
    """With n threads (PostgreSQL's case: calls that wait on the server), n calls run at
    once, and every job still runs once."""
    inner = SqliteStore(tmp_path / "j.sqlite", config=Config(lease_ttl=30.0))
    inner.register(FLOW)
    ids = inner.plan_many("flow", [{"n": i} for i in range(30)])
    store = Recording(inner)
    together = threading.Barrier(3, timeout=30)
    first: list[int] = []
    met: list[bool] = []
    lock = threading.Lock()
    claim = inner.lease_next

    def lease_next(*args: Any, **kwargs: Any) -> Any:
        with lock:
            waits = len(first) < 3
            first.append(threading.get_ident())
        if waits:
            # Only three calls in flight at once get past this: one per ledger thread.
            together.wait()
            met.append(True)
        return claim(*args, **kwargs)

    inner.lease_next = lease_next  # type: ignore[method-assign]

    def handler(ctx: impl.JobContext) -> None:
        ctx.effect("work", lambda e: e.token)
        ctx.advance("B")
        ctx.advance("C")

    w = impl.Worker(store, {"flow": handler}, concurrency=6, ledger_threads=3)  # type: ignore[arg-type]
    report = w.run(until_idle=True)
    assert met == [True, True, True]
    assert len(set(first[:3])) == 3
    assert report.finished == 30
    assert {inner.state(j) for j in ids} == {"C"}
    assert {who for (_name, who) in store.threads} == {"ledger"}
    inner.close()


def test_a_call_made_on_the_ledger_thread_itself_runs_there_at_once(tmp_path: Path) -> None:
    """A telemetry listener runs on the ledger thread (history is emitted after the
    commit, in the call); its own call through the same ledger thread must not wait for
    the thread it is running on."""
    store = SqliteStore(tmp_path / "j.sqlite", config=Config(lease_ttl=30.0))
    store.register(FLOW)
    job = store.plan("flow", {"n": 1})
    thread = LedgerThread()
    calls = threaded(store, thread)
    seen: list[str] = []

    def listener(event: object) -> None:
        if isinstance(event, HistoryEvent) and event.event is Event.ADVANCED:
            seen.append(calls.state(job))

    telemetry.add_listener(listener)
    try:
        lease = calls.lease_next("w")
        assert lease is not None
        assert calls.advance(lease, "B")
    finally:
        telemetry.remove_listener(listener)
        thread.close()
        store.close()
    assert seen == ["B"]


def test_other_store_calls_through_the_ledger_thread_run_there(tmp_path: Path) -> None:
    inner = SqliteStore(tmp_path / "j.sqlite", config=Config(lease_ttl=30.0))
    inner.register(FLOW)
    store = Recording(inner)
    thread = LedgerThread()
    calls = threaded(store, thread)  # type: ignore[arg-type]
    try:
        job = calls.plan("flow", {"n": 1})
        assert calls.job(job).state == "A"
        assert calls.path == inner.path  # an attribute, read here
    finally:
        thread.close()
        inner.close()
    assert store.threads == Counter({("plan", "ledger"): 1, ("job", "ledger"): 1})
