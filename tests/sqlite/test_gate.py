"""The writers' gate: threads of one process queue for the write lock instead of polling it.

Each test holds the gate or a write transaction in one real thread and watches what a
second thread's transaction does: which statements it sends (a trace), how long it waits,
and what it raises.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from impl.sqlite.connection import NothingToWaitFor, Tx, open_connection, writer_gate
from impl.sqlite.store import SqliteStore
from model import Config, DatabaseLocked, Workflow

OTHER = Workflow("other", ["NEW", "DONE"], [("NEW", "DONE")], "NEW", ["DONE"])


def _hold_tx(path: Path, holding: threading.Event, release: threading.Event) -> threading.Thread:
    """A thread that keeps a jobledger write transaction open on ``path`` until told."""

    def hold() -> None:
        conn = open_connection(path, Config())
        try:
            with Tx(conn, "hold"):
                holding.set()
                release.wait(10)
        finally:
            conn.close()

    thread = threading.Thread(target=hold)
    thread.start()
    assert holding.wait(10)
    return thread


def test_a_thread_behind_another_writer_of_its_process_begins_once(tmp_path: Path) -> None:
    """Queued at the gate, a writer never meets SQLite's busy lock: one BEGIN, no polling."""
    path = tmp_path / "db.sqlite"
    SqliteStore(path).close()
    holding, release = threading.Event(), threading.Event()
    holder = _hold_tx(path, holding, release)
    sent: list[str] = []
    began = threading.Event()

    def write() -> None:
        waiter = open_connection(path, Config(busy_timeout=10.0))
        waiter.set_trace_callback(sent.append)
        try:
            with Tx(waiter, "wait"):
                began.set()
        finally:
            waiter.close()

    try:
        thread = threading.Thread(target=write)
        thread.start()
        assert not began.wait(0.2), "began while another thread of the process was writing"
        release.set()
        thread.join(10)
        assert began.is_set()
    finally:
        release.set()
        holder.join(10)
    assert [s for s in sent if s.startswith("BEGIN")] == ["BEGIN IMMEDIATE"]


def test_waiting_at_the_gate_past_the_busy_timeout_is_typed(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with SqliteStore(path, config=Config(busy_timeout=0.2)) as store:
        job = store.plan("download", {"url": "a"})
        holding, release = threading.Event(), threading.Event()
        holder = _hold_tx(path, holding, release)
        try:
            with pytest.raises(DatabaseLocked, match="another thread of this process"):
                store.lease_next("w")
        finally:
            release.set()
            holder.join(10)
        assert store.state(job) == "PLANNED"
        assert store.leases() == []
        assert store.lease_next("w") is not None


def test_lease_next_at_the_gate_returns_at_once_when_nothing_is_eligible(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db.sqlite"
    # Waiting at all would end in DatabaseLocked: the gate is held for the whole call.
    with SqliteStore(path, config=Config(busy_timeout=1.0)) as store:
        store.register(OTHER)
        store.plan("other", {"n": 1})
        holding, release = threading.Event(), threading.Event()
        holder = _hold_tx(path, holding, release)
        try:
            assert store.lease_next("w", kinds=["download"]) is None
        finally:
            release.set()
            holder.join(10)


def test_a_gate_in_a_transaction_that_found_nothing_to_wait_for_is_released(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db.sqlite"
    SqliteStore(path).close()
    conn = open_connection(path, Config(busy_timeout=5.0))
    gate = writer_gate(path)
    try:
        with gate, pytest.raises(NothingToWaitFor), Tx(conn, "probe", pointless=lambda: True):
            pass
        assert not gate.locked()
        with Tx(conn, "after"):
            assert gate.locked()
        assert not gate.locked()
    finally:
        conn.close()


def test_a_transaction_that_raises_releases_the_gate(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    SqliteStore(path).close()
    conn = open_connection(path, Config())
    try:
        with pytest.raises(KeyError), Tx(conn, "boom"):
            raise KeyError("boom")
        assert not writer_gate(path).locked()
        assert not conn.in_transaction
    finally:
        conn.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_inherit_a_held_gate(tmp_path: Path) -> None:
    """A gate held by a parent's thread at fork time would never open in the child."""
    path = tmp_path / "db.sqlite"
    SqliteStore(path).close()
    gate = writer_gate(path)
    with gate:
        pid = os.fork()
        if pid == 0:  # the child: write, then report by exit status alone
            code = 1
            try:
                with SqliteStore(path, config=Config(busy_timeout=0.5)) as store:
                    store.plan("download", {"url": "from the child"})
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with SqliteStore(path) as store:
        assert len(store.jobs()) == 1
