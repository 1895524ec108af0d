"""The SQLite store agrees with the reference model, step by step, crashes included.

Each logical worker has its own ``SqliteStore`` (its own connection) on one file; the
operator has another. Crashes raise at named failpoints inside the real store, which is
then reopened from disk and checked with ``PRAGMA integrity_check``.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path

import attrs
from hypothesis import settings

from impl.ledgerthread import LedgerThread, threaded
from impl.sqlite.store import SqliteStore
from model import Config, Store
from tests.stateful.machine import WORKERS, LedgerMachine


class SqliteMachine(LedgerMachine):
    """The ledger machine with SQLite as the subject."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="jobledger-agree-"))
        self.path = self.dir / "jobs.sqlite"
        self.handles: dict[str, SqliteStore] = {}
        self.reopen()

    def subject(self, worker: str) -> Store | None:
        return self.handles[worker]

    def supports_crash(self) -> bool:
        return True

    def reopen(self) -> None:
        for handle in self.handles.values():
            handle.close()
        with closing(sqlite3.connect(self.path)) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        self.handles = {
            name: SqliteStore(self.path, clock=self.clock, config=self.config())
            for name in (*WORKERS, "op")
        }

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            for handle in self.handles.values():
                handle.close()
            shutil.rmtree(self.dir, ignore_errors=True)


TestSqliteAgreement = SqliteMachine.TestCase
TestSqliteAgreement.settings = settings(settings.default, stateful_step_count=50)


class GroupedSqliteMachine(SqliteMachine):
    """The same machine on stores that group their commits (``impl.sqlite.group``):
    every call's transaction is a member of a group transaction, and the crashes the
    machine raises at the operations' failpoints happen inside a member."""

    def config(self) -> Config:
        return attrs.evolve(super().config(), sqlite_group_window=0.005)


TestGroupedSqliteAgreement = GroupedSqliteMachine.TestCase
TestGroupedSqliteAgreement.settings = settings(settings.default, stateful_step_count=50)


class LedgerThreadSqliteMachine(SqliteMachine):
    """The same machine with every call made on a worker's ledger thread
    (``impl.ledgerthread``), as ``Worker(ledger_threads=1)`` makes its handler threads'
    calls: the crashes the machine raises at the operations' failpoints happen on that
    thread and reach the caller."""

    def __init__(self) -> None:
        self.ledger = LedgerThread()
        super().__init__()

    def subject(self, worker: str) -> Store | None:
        return threaded(self.handles[worker], self.ledger)

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            self.ledger.close()


TestLedgerThreadSqliteAgreement = LedgerThreadSqliteMachine.TestCase
TestLedgerThreadSqliteAgreement.settings = settings(settings.default, stateful_step_count=50)
