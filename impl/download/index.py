"""The artifact index: which artifact ended up as which content, in ``OUT/index.sqlite``.

One row per download job (keyed by job id, so recording it again is a no-op): artifact id,
work id, URL, final URL, SHA-256, size, content type, path in the object store, and
``duplicate_of`` (the job whose identical bytes were indexed first, or null). The
``claims`` table lets the first job to reach a final URL with given validators own it, so
a later job with the same final URL is skipped instead of fetched twice.

The index lives beside the objects it describes, not in the ledger: it is a property of
the output directory and works with every ledger backend. It is exported as
``OUT/index.jsonl`` (one JSON object per artifact, in index order), written atomically.
All SQL of the download package is in this module; every value is a bound parameter.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from attrs import asdict, frozen

from impl.download.cas import fsync_dir
from model.errors import DatabaseCorrupt, DatabaseLocked, StorageError

INDEX_FILE = "index.sqlite"
EXPORT_FILE = "index.jsonl"
BUSY_TIMEOUT_MS = 30_000

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS artifacts (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL UNIQUE,
        artifact_id TEXT NOT NULL,
        work_id TEXT NOT NULL,
        url TEXT NOT NULL,
        final_url TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        content_type TEXT,
        path TEXT NOT NULL,
        duplicate_of TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS artifacts_sha ON artifacts (sha256, seq)",
    """CREATE TABLE IF NOT EXISTS claims (
        claim_key TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        final_url TEXT NOT NULL
    )""",
)
_INSERT = (
    "INSERT OR IGNORE INTO artifacts (job_id, artifact_id, work_id, url, final_url, sha256, "
    "size, content_type, path, duplicate_of) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_COLUMNS = (
    "job_id, artifact_id, work_id, url, final_url, sha256, size, content_type, path, duplicate_of"
)


@frozen
class Artifact:
    """One row of the index."""

    job_id: str
    artifact_id: str
    work_id: str
    url: str
    final_url: str
    sha256: str
    size: int
    content_type: str | None
    path: str
    duplicate_of: str | None = None


# Connections a forked child inherited: never used there, and never freed either (freeing
# closes, and closing the last connection can checkpoint and delete the parent's WAL).
_INHERITED: list[sqlite3.Connection] = []


class ArtifactIndex:
    """The index database of one output directory.

    One object can be shared by threads: each thread (and each process) gets its own
    connection, opened on first use and kept (opening and closing one per call cost about
    1 ms per file, most of it the checkpoint and WAL removal SQLite does when the last
    connection to a file closes). Worker processes can write concurrently (WAL,
    ``BEGIN IMMEDIATE``). :meth:`close` closes them all.
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.root = Path(out_dir)
        self.path = self.root / INDEX_FILE
        self._local = threading.local()
        self._lock = threading.Lock()
        # Every connection this object opened, with the process that opened it, and the
        # generation they belong to: close() starts a new one.
        self._open: list[tuple[int, sqlite3.Connection]] = []
        self._generation = 0
        # The threads of one process take turns here rather than at SQLite's lock: a
        # connection that finds the file locked sleeps in SQLite's busy handler (1 ms,
        # 2 ms, ... up to 100 ms) however soon the lock is free, and with 64 download
        # threads every file waited through those sleeps. Other processes still meet
        # the SQLite lock and its busy timeout.
        self._writer = threading.Lock()
        with self._tx():
            pass

    def close(self) -> None:
        """Close every connection this process opened through this object (its WAL goes
        with the last one); a later call opens a new connection.

        Call it once no other thread is inside a call (e.g. after joining the workers).
        """
        pid = os.getpid()
        with self._lock:
            self._generation += 1
            mine = [conn for opener, conn in self._open if opener == pid]
            _INHERITED.extend(conn for opener, conn in self._open if opener != pid)
            self._open = []
        for conn in mine:
            conn.close()

    def _connection(self) -> sqlite3.Connection:
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is not None and local.pid == os.getpid() and local.generation == self._generation:
            return conn
        try:
            # Used by one thread only (the thread-local), closed by close() from another.
            conn = sqlite3.connect(
                self.path,
                isolation_level=None,
                timeout=BUSY_TIMEOUT_MS / 1000,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the artifact index {self.path}: {exc}") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException as exc:
            # The schema is created before the connection is kept, so a kept connection
            # never needs it again.
            _rollback(conn)
            conn.close()
            refused = self._refused(exc) if isinstance(exc, sqlite3.Error) else None
            if refused is not None:
                raise refused from None
            raise
        with self._lock:
            self._open.append((os.getpid(), conn))
            local.conn, local.pid, local.generation = conn, os.getpid(), self._generation
        return conn

    def _refused(self, exc: sqlite3.Error) -> OSError | None:
        """The file system's refusal behind a full or read-only index, or None.

        The index is a file of the output directory like the objects, so a full disk or
        a read-only mount under it is reported the same way: an ``OSError`` naming the
        file, which the pipeline treats as a fault of the world (``impl.world``).
        """
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code == sqlite3.SQLITE_FULL:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN):
            number = errno.EROFS if _read_only_mount(self.root) else errno.EACCES
            return OSError(number, os.strerror(number), str(self.path))
        return None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._writer, self._tx_unlocked() as conn:
            yield conn

    @contextmanager
    def _tx_unlocked(self) -> Iterator[sqlite3.Connection]:
        conn = None
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            _rollback(conn)
            refused = self._refused(exc)
            if refused is not None:
                raise refused from None
            if "locked" in str(exc) or "busy" in str(exc):
                raise DatabaseLocked(
                    f"the artifact index {self.path} stayed locked for "
                    f"{BUSY_TIMEOUT_MS / 1000:.0f} s; another process holds it, try again"
                ) from None
            raise StorageError(f"artifact index {self.path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            _rollback(conn)
            raise DatabaseCorrupt(
                f"the artifact index {self.path} is damaged ({exc}); delete it and run "
                "`jobledger download` again to rebuild it"
            ) from None
        except BaseException:
            _rollback(conn)
            raise

    def add(self, artifact: Artifact) -> Artifact:
        """Record ``artifact`` once and return the stored row.

        ``duplicate_of`` is decided here, in the same transaction: the job of the first
        row with the same SHA-256, or None when this is the first. A replay returns the
        row stored the first time.
        """
        with self._tx() as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM artifacts WHERE job_id = ?", (artifact.job_id,)
            ).fetchone()
            if row is None:
                first = conn.execute(
                    "SELECT job_id FROM artifacts WHERE sha256 = ? ORDER BY seq LIMIT 1",
                    (artifact.sha256,),
                ).fetchone()
                dup = first[0] if first is not None else None
                a = artifact
                conn.execute(
                    _INSERT,
                    (
                        a.job_id,
                        a.artifact_id,
                        a.work_id,
                        a.url,
                        a.final_url,
                        a.sha256,
                        a.size,
                        a.content_type,
                        a.path,
                        dup,
                    ),
                )
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM artifacts WHERE job_id = ?", (artifact.job_id,)
                ).fetchone()
        return Artifact(*row)

    def claim(
        self, claim_key: str, job_id: str, final_url: str, *, replace: str | None = None
    ) -> str:
        """Claim ``claim_key`` for ``job_id`` unless another job holds it; return the holder.

        With ``replace``, a claim held by that job (one that failed) is taken over.
        """
        with self._tx() as conn:
            if replace is not None:
                conn.execute(
                    "UPDATE claims SET job_id = ? WHERE claim_key = ? AND job_id = ?",
                    (job_id, claim_key, replace),
                )
            conn.execute(
                "INSERT OR IGNORE INTO claims (claim_key, job_id, final_url) VALUES (?, ?, ?)",
                (claim_key, job_id, final_url),
            )
            row = conn.execute(
                "SELECT job_id FROM claims WHERE claim_key = ?", (claim_key,)
            ).fetchone()
        return str(row[0])

    def get(self, job_id: str) -> Artifact | None:
        """Return the row of ``job_id``, or None."""
        with self._tx() as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM artifacts WHERE job_id = ?", (job_id,)
            ).fetchone()
        return Artifact(*row) if row is not None else None

    def all(self) -> list[Artifact]:
        """Return every row in index order."""
        with self._tx() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM artifacts ORDER BY seq").fetchall()
        return [Artifact(*r) for r in rows]

    def export_jsonl(self) -> Path:
        """Write every row to ``OUT/index.jsonl`` atomically and return its path."""
        target = self.root / EXPORT_FILE
        tmp = self.root / f".{EXPORT_FILE}.tmp"
        with tmp.open("w", encoding="utf-8") as handle:
            for artifact in self.all():
                handle.write(json.dumps(asdict(artifact), sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        fsync_dir(self.root)
        return target


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _rollback(conn: sqlite3.Connection | None) -> None:
    if conn is not None and conn.in_transaction:
        # A failed rollback leaves nothing committed; SQLite rolls back what it can.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
