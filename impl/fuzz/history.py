"""History logs: what each worker did and saw, one JSON object per line.

Every worker process owns one append-only log. Each entry is written with a single
``write`` on an ``O_APPEND`` descriptor, so a SIGKILL can at most tear the last line;
:func:`read_history` drops a torn last line and rejects damage anywhere else. Entries
carry the writer's name, its process id, the system-wide monotonic time in nanoseconds
(comparable across processes on one machine) and the simulated clock.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from attrs import frozen

Entry = Mapping[str, object]
"""One history entry as read back: ``w`` (worker), ``ev`` (event kind), ``mono``, ``t``, ..."""


class HistoryWriter:
    """Appends entries to one worker's history log; safe to share between threads.

    Args:
        path: the log file (created if missing, appended to otherwise).
        worker: the worker's name, written into every entry.
        clock: the simulated clock, read for every entry.
    """

    def __init__(self, path: Path, worker: str, clock: Callable[[], float]) -> None:
        self.path = Path(path)
        self.worker = worker
        self._clock = clock
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def write(self, event: str, **fields: object) -> None:
        """Append one entry of kind ``event`` with ``fields``."""
        entry = {
            "w": self.worker,
            "pid": os.getpid(),
            "mono": time.monotonic_ns(),
            "t": self._clock(),
            "ev": event,
            **fields,
        }
        line = (json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n").encode()
        with self._lock:
            # One write per entry: a kill tears at most this line, never an earlier one.
            os.write(self._fd, line)

    def close(self) -> None:
        """Close the log."""
        with self._lock:
            os.close(self._fd)


@frozen
class HistoryFile:
    """The entries read from one log, and whether its last line was torn by a kill."""

    path: Path
    entries: tuple[Entry, ...]
    torn: bool


class HistoryDamaged(ValueError):
    """A history log is damaged before its last line: not something a kill can cause."""


def read_history(path: Path) -> HistoryFile:
    """Read one log, ignoring a torn last line.

    Raises:
        HistoryDamaged: a line other than the last is not a JSON object.
    """
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    # A complete log ends with a newline, leaving an empty final chunk.
    tail = lines.pop()
    torn = bool(tail)
    entries: list[Entry] = []
    for number, raw in enumerate(lines, start=1):
        try:
            entry = json.loads(raw)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            raise HistoryDamaged(
                f"{path}: line {number} is not a JSON object ({raw[:80]!r}); a kill can "
                "only tear the last line, so this log was damaged some other way"
            )
        entries.append(entry)
    return HistoryFile(Path(path), tuple(entries), torn)


def read_histories(folder: Path) -> Iterator[HistoryFile]:
    """Read every ``*.jsonl`` log in ``folder``, in name order."""
    for path in sorted(Path(folder).glob("*.jsonl")):
        yield read_history(path)
