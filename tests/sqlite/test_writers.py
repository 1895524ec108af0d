"""The writers' queue of a SQLite ledger (impl.sqlite.writers), with real processes.

A process that holds the queue and dies hands it on; one that is stopped holding it
makes the others' writes raise ``DatabaseLocked`` after the busy timeout instead of
hanging (what a queue on ``flock`` could not do); a crash while holding it releases it;
and a ledger whose queue is turned off or cannot be created is written as before.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from impl import failpoint
from impl.config import load_config
from impl.sqlite import writers
from impl.sqlite.store import SqliteStore
from model import Config, Workflow
from model.errors import ConfigError, DatabaseLocked

ROOT = Path(__file__).resolve().parents[2]
FLOW = Workflow(name="f", states=["A", "B"], transitions=[("A", "B")], initial="A", terminal=["B"])
HOLD = """
import sys, time
from pathlib import Path
from impl.sqlite import writers
queue = writers.queue_for(Path(sys.argv[1]))
assert queue is not None and queue.acquire(10.0)
print("held", flush=True)
time.sleep(120)
"""

pytestmark = pytest.mark.xdist_group("processes")


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    path = tmp_path / "jobs.sqlite"
    with SqliteStore(path) as store:
        store.register(FLOW)
    return path


@pytest.fixture
def holder(ledger: Path) -> Iterator[subprocess.Popen[str]]:
    """A process that holds the ledger's writers' queue (killed and reaped at the end)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(ledger)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_killed_holder_hands_the_queue_to_the_next_writer(
    ledger: Path, holder: subprocess.Popen[str]
) -> None:
    holder.kill()
    holder.wait(timeout=30)
    queue = writers.queue_for(ledger)
    assert queue is not None
    started = time.monotonic()
    assert queue.acquire(5.0)
    assert time.monotonic() - started < 1.0
    assert queue.recovered == 1
    queue.release()
    with SqliteStore(ledger, config=Config(busy_timeout=5.0)) as store:
        started = time.monotonic()
        store.plan("f", {"n": 1})
        assert time.monotonic() - started < 1.0
        assert queue.usable
        store.plan("f", {"n": 2})
        assert len(store.jobs()) == 2


def test_a_stopped_holder_makes_a_write_raise_database_locked_not_hang(
    ledger: Path, holder: subprocess.Popen[str]
) -> None:
    """Where a queue on ``flock`` hung every writer, a stopped holder of this one costs
    the others the busy timeout and a typed error (the command line's exit code 3)."""
    holder.send_signal(signal.SIGSTOP)
    with SqliteStore(ledger, config=Config(busy_timeout=0.3)) as store:
        started = time.monotonic()
        with pytest.raises(DatabaseLocked, match="writers' queue"):
            store.plan("f", {"n": 1})
        waited = time.monotonic() - started
        assert 0.25 < waited < 5.0
        holder.send_signal(signal.SIGCONT)
        holder.kill()
        holder.wait(timeout=30)
        store.plan("f", {"n": 1})
        assert len(store.jobs()) == 1


def test_the_gate_the_queue_and_the_lock_share_one_busy_timeout(
    ledger: Path, holder: subprocess.Popen[str]
) -> None:
    """A writer that waited at this process's gate behind another thread, then waits in
    the queue, gives up one busy timeout after it began waiting, not one per wait."""
    holder.send_signal(signal.SIGSTOP)
    limit = 1.0
    with SqliteStore(ledger, config=Config(busy_timeout=limit)) as store:
        outcomes: dict[str, tuple[type[BaseException] | None, float]] = {}

        def write(name: str) -> None:
            started = time.monotonic()
            try:
                store.plan("f", {"n": name})
            except DatabaseLocked as exc:
                outcomes[name] = (type(exc), time.monotonic() - started)
            else:
                outcomes[name] = (None, time.monotonic() - started)

        first = threading.Thread(target=write, args=("first",))
        first.start()
        time.sleep(0.2)  # the first holds the gate, waiting in the queue
        second = threading.Thread(target=write, args=("second",))
        second.start()
        first.join(30)
        second.join(30)
    assert outcomes["first"][0] is DatabaseLocked
    error, waited = outcomes["second"]
    assert error is DatabaseLocked
    # One busy timeout in all (about 1.0 s); a timeout per wait made it about 1.8 s.
    assert waited < limit + 0.6, waited


def test_waiting_in_the_queue_still_asks_whether_anything_is_eligible(
    ledger: Path, holder: subprocess.Popen[str]
) -> None:
    """``lease_next`` on a ledger with nothing to do returns None at once, even while
    another process holds the queue, instead of waiting the busy timeout out."""
    with SqliteStore(ledger, config=Config(busy_timeout=10.0)) as store:
        started = time.monotonic()
        assert store.lease_next("w") is None
        assert time.monotonic() - started < 2.0


def test_a_crash_while_holding_the_queue_releases_it(ledger: Path) -> None:
    config = Config(busy_timeout=2.0)
    with SqliteStore(ledger, config=config) as store:
        failpoint.arm("writers.after_acquire")
        try:
            with pytest.raises(failpoint.Crash):
                store.plan("f", {"n": 1})
        finally:
            failpoint.disarm_all()
        done: list[str] = []

        def plan_elsewhere() -> None:
            done.append(store.plan("f", {"n": 2}))

        thread = threading.Thread(target=plan_elsewhere)
        thread.start()
        thread.join(timeout=10)
        assert len(done) == 1
        assert [j.job_id for j in store.jobs()] == done
    # Free for another process too: a child takes it at once.
    proc = subprocess.run(
        [sys.executable, "-c", HOLD.replace("time.sleep(120)", ""), str(ledger)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.stdout.strip() == "held", proc.stderr


def test_the_queue_turned_off_does_not_wait_for_its_holder(
    ledger: Path, holder: subprocess.Popen[str]
) -> None:
    with SqliteStore(ledger, config=Config(busy_timeout=0.3, sqlite_writers_queue="none")) as store:
        store.plan("f", {"n": 1})
        assert store.lease_next("w") is not None


def test_a_queue_file_that_cannot_be_made_leaves_writes_as_before(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    (tmp_path / "jobs.sqlite-writers").mkdir()
    assert writers.queue_for(path) is None
    with SqliteStore(path) as store:
        store.register(FLOW)
        store.plan("f", {"n": 1})
        lease = store.lease_next("w")
        assert lease is not None
        assert store.advance(lease, "B")


def test_the_queue_file_is_made_next_to_the_ledger_with_its_permissions(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    with SqliteStore(path) as store:
        store.register(FLOW)
    mode = path.stat().st_mode & 0o777
    assert (tmp_path / "jobs.sqlite-writers").stat().st_mode & 0o777 == mode & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_writers_queue_setting_is_validated_and_read_from_the_environment() -> None:
    assert Config().sqlite_writers_queue == "mutex"
    with pytest.raises(ConfigError, match="'mutex' or 'none'"):
        Config(sqlite_writers_queue="off")
    loaded, sources = load_config(
        config_file=None, env={"JOBLEDGER_SQLITE_WRITERS_QUEUE": "none"}, overrides={}
    )
    assert loaded.sqlite_writers_queue == "none"
    assert sources["sqlite_writers_queue"] == "JOBLEDGER_SQLITE_WRITERS_QUEUE"
