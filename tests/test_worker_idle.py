"""Idle handler threads of a worker run without ``until_idle``: one waits on the store,
the others sleep behind it, and work or a stop wakes them all (issue 15, target 4)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import impl
from impl.sqlite.store import SqliteStore
from model import Workflow

FLOW = Workflow("flow", ["A", "B"], [("A", "B")], initial="A", terminal=["B"])
THREADS = 8
WATCHDOG = 10.0


class _CountedWaits:
    """The store's ``wait_for_work``, counting the callers inside it at once."""

    def __init__(self, store: SqliteStore) -> None:
        self._real = store.wait_for_work
        self._lock = threading.Lock()
        self.inside = 0
        self.most = 0
        self.calls = 0

    def __call__(
        self, timeout: float, *, kinds: Sequence[str] | None = None, stop: Any = None
    ) -> bool:
        with self._lock:
            self.inside += 1
            self.calls += 1
            self.most = max(self.most, self.inside)
        try:
            return self._real(timeout, kinds=kinds, stop=stop)
        finally:
            with self._lock:
                self.inside -= 1


def test_one_idle_thread_waits_on_the_store_and_work_wakes_them_all(tmp_path: Path) -> None:
    """Eight idle threads: one waits on the store, however long they stay idle (each
    waiting on it would wake on every commit of the busy ones and read the queue). A
    plan of eight jobs that each hold their thread until all eight run proves that the
    sleepers woke too; a stop ends the run at once though the poll is an hour."""
    db = tmp_path / "j.sqlite"
    with SqliteStore(db) as store, SqliteStore(db) as planner:
        store.register(FLOW)
        waits = _CountedWaits(store)
        store.wait_for_work = waits  # type: ignore[method-assign]
        together = threading.Barrier(THREADS)

        def handler(ctx: impl.JobContext) -> None:
            together.wait(WATCHDOG)  # breaks (raises) unless all eight run at once
            ctx.advance("B")

        worker = impl.Worker(store, {"flow": handler}, concurrency=THREADS, idle_poll=3600.0)
        reports: list[impl.RunReport] = []
        thread = threading.Thread(target=lambda: reports.append(worker.run()), daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + WATCHDOG
            while waits.calls == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)  # every thread has found nothing and gone to wait by now
            assert (waits.inside, waits.most) == (1, 1)
            planner.plan_many("flow", [{"n": n} for n in range(THREADS)])
            deadline = time.monotonic() + WATCHDOG
            while planner.stats().by_state["flow"]["B"] < THREADS:
                assert time.monotonic() < deadline, "the sleeping idle threads missed the work"
                time.sleep(0.01)
        finally:
            stopped = time.monotonic()
            worker.stop()
            thread.join(WATCHDOG)
        assert not thread.is_alive()
        assert time.monotonic() - stopped < 2.0, "idle threads slept through the stop"
        assert reports[0].finished == THREADS
        assert reports[0].failed == 0
        assert waits.most == 1, f"{waits.most} idle threads waited on the store at once"
