"""Checkpoints off the writers' path: one background thread per store and process.

In WAL mode every commit appends the pages it changed to the WAL, and a checkpoint copies
them back into the database file (with an fsync). Left to SQLite, the writer whose
commit passes ``wal_autocheckpoint`` pages does that copy inside its own call, every few
hundred jobs. Instead, this thread runs a PASSIVE checkpoint every :data:`INTERVAL`
seconds on a connection of its own: writers never wait for it and it never waits for
them, a page rewritten many times in between is copied once, and on a machine with a
second core the copy runs beside the writers. Writers keep a high ``wal_autocheckpoint``
(queries.PRAGMA_WAL_AUTOCHECKPOINT) as a backstop for a burst the thread cannot keep up
with. A checkpoint is SQLite's own crash-safe operation; killing the process at any
moment loses nothing that was committed.

Only with ``synchronous`` OFF or NORMAL: with FULL or EXTRA every commit syncs the WAL,
and a sync of a WAL that grew (rather than one rewritten from its start after each
checkpoint, as SQLite's small default keeps it) must also journal the file's new size,
which made every commit slower than the checkpoints it saved; a background checkpoint's
own syncs compete with the commits' too.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

from impl import telemetry
from impl.sqlite import queries as q
from model.config import Config
from model.errors import StorageError

INTERVAL = 0.2
"""Seconds between two checkpoints."""

Opener = Callable[[], tuple[sqlite3.Connection, object]]
"""Opens the thread's connection; the second item must be kept alive while it is used."""

_JOIN_TIMEOUT = 10.0
_LOG = telemetry.logger("storage")


def checkpoints_in_background(config: Config) -> bool:
    """True if a store with ``config`` checkpoints in a background thread."""
    return config.sqlite_synchronous in ("OFF", "NORMAL")


class Checkpointer:
    """Runs the checkpoint thread for one database file in the current process.

    :meth:`ensure_running` starts it (again in a forked child, where threads do not
    survive); :meth:`stop` ends it and waits for it to close its connection.
    """

    def __init__(self, path: Path, opener: Opener) -> None:
        self._path = path
        self._opener = opener
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._pid = 0
        self._stopped = False

    def ensure_running(self) -> None:
        """Start the thread in this process unless it runs or the store was closed."""
        pid = os.getpid()
        if self._pid == pid:
            return
        with self._lock:
            if self._pid == pid or self._stopped:
                return
            # A child inherits the parent's Event and thread object, not the thread.
            self._stop = threading.Event()
            thread = threading.Thread(
                target=_run,
                args=(self._path, self._opener, self._stop),
                name=f"jobledger-checkpoint:{self._path.name}",
                daemon=True,
            )
            thread.start()
            self._thread, self._pid = thread, pid

    def stop(self, *, wait: bool = True) -> None:
        """Stop the thread (idempotent); it closes its connection before it ends.

        With ``wait`` (the default) return only once it has.
        """
        with self._lock:
            self._stopped = True
            thread = self._thread if self._pid == os.getpid() else None
            self._stop.set()
            self._thread, self._pid = None, 0
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT)


def _run(path: Path, opener: Opener, stop: threading.Event) -> None:
    try:
        conn, _keep = opener()
    except StorageError as exc:
        _LOG.debug("checkpointer for %s not started: %s", path, exc)
        return
    try:
        while not stop.wait(INTERVAL):
            try:
                conn.execute(q.CHECKPOINT_PASSIVE).fetchall()
            except sqlite3.Error as exc:
                # A full disk or a read-only file: the writers see it themselves; the
                # backstop autocheckpoint still bounds the WAL once it clears.
                _LOG.debug("checkpoint of %s failed: %s", path, exc)
    finally:
        conn.close()
