"""Fixtures for the command-line tests: a populated ledger, and two ways to run the command.

``run`` goes through click's ``CliRunner`` (fast, in process); ``run_process`` starts a
real ``python -m impl`` so the console entry, exit codes and stderr are what a shell sees.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from attrs import define
from click.testing import CliRunner

from impl import failpoint
from model import ManualClock, Store, Workflow

ROOT = Path(__file__).resolve().parents[2]

THUMB = Workflow(
    name="thumb",
    states=["PLANNED", "DONE"],
    transitions=[("PLANNED", "DONE")],
    initial="PLANNED",
    terminal=["DONE"],
)
"""A tiny workflow for worker tests."""


@define
class Outcome:
    """What one command run produced."""

    code: int
    out: str
    err: str


@define
class Ledger:
    """A database with one job in each interesting situation."""

    path: Path
    live: str  # leased by worker-1 for an hour, HEAD recorded, at HEAD_DONE
    expired: str  # its lease expired; a STREAM effect started and never recorded
    cancelled: str  # cancelled by an operator: FAILED with a reason
    waiting: str  # planned and eligible
    has_doubt: bool


def _identity(n: int) -> dict[str, str]:
    return {
        "work_id": f"w{n}",
        "artifact_id": f"a{n}",
        "canonical_url": f"https://example.org/{n}.bin",
    }


def populate(store: Store, clock: ManualClock, path: Path) -> Ledger:
    """Fill ``store`` with the jobs :class:`Ledger` describes; clock starts 100 s ago."""
    waiting = store.plan("download", _identity(1), priority=0)
    cancelled = store.plan("download", _identity(2), priority=10, payload={"why": "test"})
    live = store.plan("download", _identity(3), priority=20)
    expired = store.plan("download", _identity(4), priority=30)
    store.register(THUMB)

    lease = store.lease_next("worker-0", ttl=10)
    assert lease is not None
    assert lease.job_id == expired
    has_doubt = True
    failpoint.arm("effect.after_start")
    try:
        store.run_effect(lease, "STREAM", lambda ctx: {"bytes": 1})
        has_doubt = False  # a backend without failpoints (the model) recorded it
    except failpoint.Crash:
        pass
    finally:
        failpoint.disarm_all()

    # Granted while the first lease still lives, so the next job in order comes out.
    lease = store.lease_next("worker-1", ttl=3600)
    assert lease is not None
    assert lease.job_id == live
    store.run_effect(lease, "HEAD", lambda ctx: {"status": 200, "length": 5})
    store.advance(lease, "HEAD_DONE")
    clock.advance(50)
    store.cancel(cancelled, "bad url")
    return Ledger(path, live, expired, cancelled, waiting, has_doubt)


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    """A SQLite ledger at ``tmp_path/jobs.sqlite`` written on a clock 100 s in the past."""
    from impl import open_store

    path = tmp_path / "jobs.sqlite"
    clock = ManualClock(time.time() - 100)
    store = open_store(path, clock=clock)
    try:
        return populate(store, clock, path)
    finally:
        store.close()


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Outcome]:
    """Run ``jobledger ARGS`` in process, in ``tmp_path``, with a clean JOBLEDGER_* env."""
    from impl.cli.main import cli

    for name in list(os.environ):
        if name.startswith("JOBLEDGER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    # Tables are laid out for COLUMNS when not on a terminal; pin it so tests see whole rows.
    monkeypatch.setenv("COLUMNS", "200")

    def invoke(*args: str, env: Mapping[str, str] | None = None, obj: object = None) -> Outcome:
        runner = CliRunner()
        result = runner.invoke(cli, list(args), env=dict(env or {}), obj=obj)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return Outcome(result.exit_code, result.stdout, result.stderr)

    return invoke


def process_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a real ``python -m impl``: the project importable, no JOBLEDGER_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBLEDGER_")}
    env["PYTHONPATH"] = str(ROOT)
    env["COLUMNS"] = "200"
    env.update(extra or {})
    return env


@pytest.fixture
def run_process(tmp_path: Path) -> Callable[..., Outcome]:
    """Run ``python -m impl ARGS`` as a real process in ``tmp_path``."""

    def invoke(*args: str, env: Mapping[str, str] | None = None) -> Outcome:
        proc = subprocess.run(
            [sys.executable, "-m", "impl", *args],
            cwd=tmp_path,
            env=process_env(env),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return Outcome(proc.returncode, proc.stdout, proc.stderr)

    return invoke


def lock_exclusively(path: Path) -> sqlite3.Connection:
    """Hold an exclusive lock on ``path``: neither readers nor writers get in."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("BEGIN EXCLUSIVE")
    return conn


def lock_for_writes(path: Path) -> sqlite3.Connection:
    """Hold the write lock on ``path`` as a long write transaction would."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def make_newer(path: Path) -> None:
    """Record a schema version newer than this code knows in the database at ``path``."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, 'x', 0)"
        )
    finally:
        conn.close()


def make_corrupt(path: Path) -> None:
    """Write garbage where a database should be."""
    path.write_bytes(b"this is not a database, just bytes " * 200)
