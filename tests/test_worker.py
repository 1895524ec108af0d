"""The worker runtime: renewal while handlers run, failures with backoff, progress rules,
graceful stop on SIGTERM, and several handler threads on one SQLite file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

import impl
from impl.sqlite.store import SqliteStore
from model import Config, Event, ManualClock, MemoryStore, Workflow

FLOW = Workflow("flow", ["A", "B", "C"], [("A", "B"), ("B", "C")], initial="A", terminal=["C"])
ROOT = Path(__file__).resolve().parents[1]


def test_background_renewal_keeps_a_slow_handler_s_lease(tmp_path: Path) -> None:
    """A handler that runs longer than the TTL keeps its lease because the worker renews it."""
    store = SqliteStore(tmp_path / "j.sqlite", config=Config(lease_ttl=0.6))
    store.register(FLOW)
    jid = store.plan("flow", {"n": 1})

    def slow(ctx: impl.JobContext) -> None:
        time.sleep(1.5)  # 2.5 TTLs: without renewal the lease would be lost
        ctx.advance("B")
        ctx.advance("C")

    report = impl.Worker(store, {"flow": slow}, renew_every=0.15).run(until_idle=True)
    assert report.finished == 1
    assert report.lost == 0
    assert store.state(jid) == "C"
    assert Event.RENEWED in [h.event for h in store.history(jid)]
    store.close()


def test_the_worker_renews_at_the_store_s_ttl_not_a_default(tmp_path: Path) -> None:
    """With no ttl or renew_every given, the renewal follows the store's lease_ttl."""
    store = SqliteStore(tmp_path / "j.sqlite", config=Config(lease_ttl=0.6))
    store.register(FLOW)
    jid = store.plan("flow", {"n": 1})

    def slow(ctx: impl.JobContext) -> None:
        time.sleep(1.5)
        ctx.advance("B")
        ctx.advance("C")

    worker = impl.Worker(store, {"flow": slow})
    assert worker.renew_every == pytest.approx(0.2)
    report = worker.run(until_idle=True)
    assert (report.finished, report.lost) == (1, 0)
    assert store.state(jid) == "C"
    store.close()


def test_an_exception_fails_the_attempt_with_backoff() -> None:
    clock = ManualClock()
    store = MemoryStore(clock=clock, config=Config(backoff_base=2.0))
    store.register(FLOW)
    jid = store.plan("flow", {"n": 1})

    def broken(ctx: impl.JobContext) -> None:
        raise ValueError("bad input file")

    worker = impl.Worker(store, {"flow": broken})
    assert worker.run_once() is True
    info = store.job(jid)
    assert info.state == "A"
    assert info.attempts == 1
    assert info.last_error == "ValueError: bad input file"
    assert info.run_at == clock() + 2.0
    assert worker.run_once() is False  # backing off: nothing eligible yet


def test_a_permanent_exception_fails_the_job_at_once() -> None:
    store = MemoryStore(clock=ManualClock())
    store.register(FLOW)
    jid = store.plan("flow", {"n": 1})

    class Gone(Exception):
        retryable = False

    def handler(ctx: impl.JobContext) -> None:
        raise Gone("404 Not Found")

    impl.Worker(store, {"flow": handler}).run_once()
    assert store.state(jid) == "FAILED"
    assert store.job(jid).attempts == 1


def test_a_handler_that_makes_no_progress_counts_as_a_failure() -> None:
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    store.register(FLOW)
    jid = store.plan("flow", {"n": 1})
    worker = impl.Worker(store, {"flow": lambda ctx: None})
    assert worker.run_once() is True
    info = store.job(jid)
    assert info.attempts == 1
    assert info.last_error == impl.worker.NO_PROGRESS_ERROR
    assert info.run_at > clock()


def test_a_handler_that_advanced_but_did_not_finish_releases_the_job() -> None:
    store = MemoryStore(clock=ManualClock())
    store.register(FLOW)
    jid = store.plan("flow", {"n": 1})
    worker = impl.Worker(store, {"flow": lambda ctx: ctx.advance("B")})
    worker.run_once()
    info = store.job(jid)
    assert (info.state, info.attempts, info.lease_worker) == ("B", 0, None)
    assert [h.event for h in store.history(jid)][-1] is Event.RELEASED


@pytest.mark.parametrize("concurrency", [1, 2], ids=["own-calls", "ledger-thread"])
def test_effect_then_finishes_the_job_with_its_results(tmp_path: Path, concurrency: int) -> None:
    """``ctx.effect(..., then=)`` advances in the effect's own transaction: the context
    follows the state, and a terminal ``then`` finishes the job with no further call."""
    store = SqliteStore(tmp_path / "j.sqlite")
    store.register(FLOW)
    jid = store.plan("flow", {"n": 1})
    seen: list[tuple[str, bool]] = []

    def handler(ctx: impl.JobContext) -> None:
        ctx.effect("fetch", lambda e: "fetched", then="B")
        seen.append((ctx.state, ctx.advanced))
        ctx.effect("store", lambda e: "stored", then="C")
        seen.append((ctx.state, ctx.is_terminal()))

    report = impl.Worker(store, {"flow": handler}, concurrency=concurrency).run(until_idle=True)
    assert (report.finished, report.failed) == (1, 0)
    assert seen == [("B", True), ("C", True)]
    info = store.job(jid)
    assert (info.state, info.attempts, info.lease) == ("C", 1, None)
    assert [str(h.event) for h in store.history(jid)] == [
        "planned",
        "leased",
        "effect_started",
        "effect_recorded",
        "advanced",
        "effect_started",
        "effect_recorded",
        "advanced",
    ]
    store.close()


def test_effect_then_to_a_middle_state_is_progress() -> None:
    store = MemoryStore(clock=ManualClock())
    store.register(FLOW)
    jid = store.plan("flow", {"n": 1})
    worker = impl.Worker(store, {"flow": lambda ctx: ctx.effect("x", lambda e: 1, then="B")})
    worker.run_once()
    info = store.job(jid)
    assert (info.state, info.attempts, info.lease_worker) == ("B", 0, None)
    assert [h.event for h in store.history(jid)][-1] is Event.RELEASED


def test_effect_then_to_a_state_already_reached_is_no_progress() -> None:
    """A replayed effect whose ``then`` the job had passed moves nothing, so a handler
    that does only that has made no progress and cannot spin."""
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    store.register(FLOW)
    jid = store.plan("flow", {"n": 1})
    worker = impl.Worker(store, {"flow": lambda ctx: ctx.effect("x", lambda e: 1, then="B")})
    worker.run_once()
    worker.run_once()
    info = store.job(jid)
    assert (info.state, info.attempts) == ("B", 1)
    assert info.last_error == impl.worker.NO_PROGRESS_ERROR


def test_effects_replay_after_a_handler_crash_instead_of_running_again() -> None:
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    store.register(FLOW)
    jid = store.plan("flow", {"n": 1})
    calls: list[str] = []

    def handler(ctx: impl.JobContext) -> None:
        ctx.effect("send", lambda e: calls.append(e.op_key) or {"sent": True})
        ctx.advance("B")
        if len(calls) == 1 and ctx.lease.attempt == 1:
            raise RuntimeError("crash after the effect")
        ctx.advance("C")

    worker = impl.Worker(store, {"flow": handler})
    worker.run_once()
    clock.advance(60)
    worker.run_once()
    assert store.state(jid) == "C"
    assert len(calls) == 1


def test_unknown_kind_is_refused_when_the_worker_is_built() -> None:
    store = MemoryStore(clock=ManualClock())
    with pytest.raises(impl.UnknownWorkflow):
        impl.Worker(store, {"nope": lambda ctx: None})
    with pytest.raises(impl.InvalidInput):
        impl.Worker(store, {"download": lambda ctx: None}, concurrency=0)


def test_handler_threads_on_one_file_never_share_a_job(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "j.sqlite", config=Config(lease_ttl=5.0))
    store.register(FLOW)
    ids = store.plan_many("flow", [{"n": i} for i in range(60)])
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def handler(ctx: impl.JobContext) -> None:
        with lock:
            seen[ctx.job_id] += 1
        ctx.effect("work", lambda e: {"token": e.token})
        ctx.advance("B")
        ctx.advance("C")

    report = impl.Worker(store, {"flow": handler}, concurrency=4).run(until_idle=True)
    assert report.finished == 60
    assert set(seen) == set(ids)
    assert max(seen.values()) == 1
    assert {store.state(j) for j in ids} == {"C"}
    store.close()


CHILD = textwrap.dedent(
    """
    import sys, time
    import impl
    from impl.sqlite.store import SqliteStore
    from model import Workflow
    flow = Workflow("flow", ["A", "B", "C"], [("A", "B"), ("B", "C")], initial="A", terminal=["C"])
    store = SqliteStore(sys.argv[1])
    store.register(flow)
    store.plan("flow", {"n": 1})

    def handler(ctx):
        def slow(e):
            print("effect running", flush=True)
            time.sleep(1.0)
            return {"done": True}
        ctx.effect("slow", slow)
        ctx.advance("B")  # refused: the worker is stopping
        ctx.advance("C")

    impl.Worker(store, {"flow": handler}).run()
    print("stopped", flush=True)
    """
)


@pytest.mark.xdist_group("processes")
def test_sigterm_stops_after_the_current_effect_and_releases(tmp_path: Path) -> None:
    db = tmp_path / "j.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "effect running"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    assert "stopped" in out
    with SqliteStore(db) as store:
        (info,) = store.jobs()
        assert info.state == "A"
        assert info.attempts == 0  # released: a graceful stop costs no attempt
        assert info.lease_worker is None
        (effect,) = store.effects(info.job_id)
        assert effect.status == "done"  # the current effect finished and was recorded


def test_a_renewal_that_finds_the_lease_lost_stops_the_handler_s_writes() -> None:
    """An operator cancel fences the holder; the background renewal notices and the
    handler's next write raises LeaseLost before touching the store."""
    store = MemoryStore(clock=ManualClock())
    store.register(FLOW)
    jid = store.plan("flow", {"n": 1})
    seen: list[bool] = []

    def handler(ctx: impl.JobContext) -> None:
        store.cancel(ctx.job_id, "operator stop")
        deadline = time.monotonic() + 5.0
        while not ctx._lost.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(ctx._lost.is_set())
        ctx.advance("B")

    report = impl.Worker(store, {"flow": handler}, renew_every=0.05).run(until_idle=True)
    assert seen == [True]
    assert report.lost == 1
    assert store.state(jid) == "FAILED"
    assert store.job(jid).last_error == "operator stop"
