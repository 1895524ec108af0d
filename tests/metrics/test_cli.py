"""The metrics commands as an operator runs them: real processes, real ports.

``jobledger metrics serve`` and ``jobledger worker --metrics-port`` serve over HTTP on
127.0.0.1, stop cleanly on SIGTERM, and refuse a taken port with one line and exit 2,
before the worker leases anything.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from impl.sqlite.store import SqliteStore
from model import Workflow

from .scrape import by_key, scrape

ROOT = Path(__file__).resolve().parents[2]
FLOW = Workflow("flow", ["A", "B"], [("A", "B")], initial="A", terminal=["B"])
WATCHDOG = 30.0

HANDLERS = textwrap.dedent(
    """
    def done(ctx):
        ctx.effect("work", lambda e: {"ok": True})
        ctx.advance("B")

    handlers = {"flow": done}
    """
)

pytestmark = pytest.mark.xdist_group("processes")


def _jobledger(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "impl", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _line(stream: IO[str] | None) -> str:
    """The next line of ``stream``, within the watchdog."""
    assert stream is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    return lines.get(timeout=WATCHDOG)


def _url(line: str) -> str:
    found = [word for word in line.split() if word.startswith("http://")]
    assert found, f"no URL in {line!r}"
    return found[0]


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    db = tmp_path / "j.sqlite"
    with SqliteStore(db) as store:
        store.register(FLOW)
        store.plan("flow", {"n": 1})
        store.plan("flow", {"n": 2})
    return db


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something already listens on, on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=WATCHDOG)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def test_metrics_serve_answers_scrapes_until_sigterm(ledger: Path, tmp_path: Path) -> None:
    proc = _jobledger("--db", str(ledger), "metrics", "serve", "--port", "0", cwd=tmp_path)
    try:
        url = _url(_line(proc.stdout))
        assert url.startswith("http://127.0.0.1:")
        got = by_key(scrape(url))
        assert got[("jobledger_jobs", (("kind", "flow"), ("state", "A")))] == 2
        assert got[("jobledger_jobs", (("kind", "flow"), ("state", "B")))] == 0
        assert got[("jobledger_ledger_up", ())] == 1
        assert ("process_cpu_seconds_total", ()) in got
    finally:
        code, err = _stop(proc)
    assert code == 0, err
    assert "Traceback" not in err


def test_metrics_serve_on_a_taken_port_is_one_line_and_exit_2(
    ledger: Path, tmp_path: Path, taken_port: int
) -> None:
    proc = _jobledger(
        "--db", str(ledger), "metrics", "serve", "--port", str(taken_port), cwd=tmp_path
    )
    out, err = proc.communicate(timeout=WATCHDOG)
    assert proc.returncode == 2
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        f"error: cannot serve metrics on 127.0.0.1:{taken_port}: the port is already in use; "
        "stop what listens there or choose another --port (0 picks a free one)"
    ]
    assert out == ""


def test_a_worker_serves_its_metrics_while_it_runs(ledger: Path, tmp_path: Path) -> None:
    (tmp_path / "myjobs.py").write_text(HANDLERS)
    proc = _jobledger(
        "--db", str(ledger), "worker", "myjobs:handlers", "--metrics-port", "0", cwd=tmp_path
    )
    try:
        url = _url(_line(proc.stderr))
        deadline = time.monotonic() + WATCHDOG
        got = by_key(scrape(url))
        while got[("jobledger_worker_jobs_finished_total", ())] < 2:
            assert time.monotonic() < deadline, f"the worker did not finish its jobs: {got}"
            time.sleep(0.1)
            got = by_key(scrape(url))
        assert got[("jobledger_worker_jobs_leased_total", ())] == 2
        effects = (
            "jobledger_worker_effect_duration_seconds_count",
            (("kind", "flow"), ("op", "work")),
        )
        assert got[effects] == 2
    finally:
        code, err = _stop(proc)
    assert code == 130  # stopped by a signal, as the worker command documents
    assert "Traceback" not in err


def test_a_worker_on_a_taken_metrics_port_leases_nothing(
    ledger: Path, tmp_path: Path, taken_port: int
) -> None:
    (tmp_path / "myjobs.py").write_text(HANDLERS)
    proc = _jobledger(
        "--db",
        str(ledger),
        "worker",
        "myjobs:handlers",
        "--metrics-port",
        str(taken_port),
        cwd=tmp_path,
    )
    _, err = proc.communicate(timeout=WATCHDOG)
    assert proc.returncode == 2
    assert "Traceback" not in err
    assert "the port is already in use" in err
    with SqliteStore(ledger) as store:
        assert [job.attempts for job in store.jobs()] == [0, 0]


def test_metrics_serve_on_an_address_not_of_this_machine_is_exit_2(
    ledger: Path, tmp_path: Path
) -> None:
    # TEST-NET-1 (RFC 5737): never an address of this machine.
    proc = _jobledger(
        "--db", str(ledger), "metrics", "serve", "--host", "192.0.2.1", "--port", "0", cwd=tmp_path
    )
    _, err = proc.communicate(timeout=WATCHDOG)
    assert proc.returncode == 2
    assert "Traceback" not in err
    assert err.startswith("error: cannot serve metrics on 192.0.2.1:0: ")
    assert "pass an address of this machine as --host" in err
