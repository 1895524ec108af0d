"""The fenced sink: the downstream system the fuzzed effects write into.

It records every execution an effect attempts and, as a well-behaved downstream
resource should, rejects a fencing token lower than the highest it has accepted for the
same job. It is a SQLite file of its own (separate from the ledger), so a SIGKILL in the
middle of an execution leaves it consistent: an execution is recorded wholly or not at
all. The checker re-verifies the fencing rule from the recorded executions rather than
trusting the sink.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from attrs import frozen

BUSY_TIMEOUT = 60.0

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS fence (job_id TEXT PRIMARY KEY, high INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS execution ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " job_id TEXT NOT NULL, op TEXT NOT NULL, op_key TEXT NOT NULL,"
    " token INTEGER NOT NULL, exec_id TEXT NOT NULL, worker TEXT NOT NULL,"
    " accepted INTEGER NOT NULL, high_before INTEGER)",
)
_SELECT_HIGH = "SELECT high FROM fence WHERE job_id = ?"
_UPSERT_HIGH = (
    "INSERT INTO fence (job_id, high) VALUES (?, ?) "
    "ON CONFLICT (job_id) DO UPDATE SET high = excluded.high"
)
_INSERT_EXECUTION = (
    "INSERT INTO execution (job_id, op, op_key, token, exec_id, worker, accepted, high_before) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT_EXECUTIONS = (
    "SELECT seq, job_id, op, op_key, token, exec_id, worker, accepted, high_before "
    "FROM execution ORDER BY seq"
)


@frozen
class Execution:
    """One execution the sink saw, in the sink's global order ``seq``."""

    seq: int
    job_id: str
    op: str
    op_key: str
    token: int
    exec_id: str
    worker: str
    accepted: bool
    high_before: int | None


class FencedSink:
    """A fenced downstream resource in the SQLite file at ``path``.

    Args:
        path: the sink's database file (created if missing).
        fenced: reject tokens lower than the highest seen (False only to prove that the
            checker catches a sink without fencing).
    """

    def __init__(self, path: Path, *, fenced: bool = True) -> None:
        self.path = Path(path)
        self.fenced = fenced
        self._conn = sqlite3.connect(
            self.path, isolation_level=None, timeout=BUSY_TIMEOUT, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                self._conn.execute(statement)
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def execute(
        self, *, job_id: str, op: str, op_key: str, token: int, exec_id: str, worker: str
    ) -> bool:
        """Record one execution; return True if accepted, False if fenced out."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(_SELECT_HIGH, (job_id,)).fetchone()
            high = None if row is None else int(row[0])
            accepted = not self.fenced or high is None or token >= high
            if accepted and (high is None or token > high):
                conn.execute(_UPSERT_HIGH, (job_id, token))
            conn.execute(
                _INSERT_EXECUTION, (job_id, op, op_key, token, exec_id, worker, accepted, high)
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return accepted

    def executions(self) -> list[Execution]:
        """Return every recorded execution in the sink's order."""
        rows = self._conn.execute(_SELECT_EXECUTIONS).fetchall()
        return [
            Execution(
                seq=int(r[0]),
                job_id=str(r[1]),
                op=str(r[2]),
                op_key=str(r[3]),
                token=int(r[4]),
                exec_id=str(r[5]),
                worker=str(r[6]),
                accepted=bool(r[7]),
                high_before=None if r[8] is None else int(r[8]),
            )
            for r in rows
        ]

    def integrity(self) -> str:
        """Return SQLite's ``integrity_check`` verdict ("ok" when intact)."""
        return str(self._conn.execute("PRAGMA integrity_check").fetchone()[0])

    def close(self) -> None:
        """Close the sink's connection."""
        self._conn.close()


def integrity_of(path: Path) -> str:
    """Return SQLite's ``integrity_check`` verdict for the database file at ``path``.

    "ok" when intact; otherwise SQLite's first complaint, or the error that stopped
    the check (a file that is not a database, for one).
    """
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT)
        try:
            return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"{type(exc).__name__}: {exc}"
