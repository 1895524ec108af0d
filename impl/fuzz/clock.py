"""The shared simulated clock: written by the parent only, read lock-free by workers.

The clock lives in a small memory-mapped file holding a sequence counter and one 8-byte
float (a seqlock). The parent makes the counter odd, writes the value, and makes it even
again; a reader retries while the counter is odd or changed under it. Readers take no
lock and write nothing, so a worker SIGKILLed in the middle of a read leaves the clock
exactly as it was; only the parent, whose death ends the run anyway, ever writes.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

_LAYOUT = struct.Struct("<Qd")
_SEQ = struct.Struct("<Q")
_VALUE = struct.Struct("<d")
SIZE = _LAYOUT.size
START_DEFAULT = 1_000_000.0


class SharedClock:
    """The parent's writable handle on the shared clock file.

    Args:
        path: the clock file (created or truncated).
        start: the initial time in seconds.
    """

    def __init__(self, path: Path, *, start: float = START_DEFAULT) -> None:
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, SIZE)
            self._map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        self._seq = 0
        self._now = float(start)
        _LAYOUT.pack_into(self._map, 0, 0, self._now)

    def __call__(self) -> float:
        """Return the current simulated time (the parent's own copy)."""
        return self._now

    @property
    def now(self) -> float:
        """The current simulated time in seconds."""
        return self._now

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds`` and publish it; return the new time."""
        if not seconds >= 0:
            raise ValueError(f"the shared clock only moves forward; got a step of {seconds} s")
        self._now += seconds
        self._seq += 1
        _SEQ.pack_into(self._map, 0, self._seq)  # odd: a write is in progress
        _VALUE.pack_into(self._map, _SEQ.size, self._now)
        self._seq += 1
        _SEQ.pack_into(self._map, 0, self._seq)
        return self._now

    def close(self) -> None:
        """Unmap the clock file (the file stays for the post-mortem)."""
        self._map.close()


class ClockReader:
    """A worker's read-only view of the shared clock; a ``Clock`` for the store.

    Reads never block and never write. The value returned never goes backwards within
    one reader, whatever the scheduling.
    """

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as handle:
            self._map = mmap.mmap(handle.fileno(), SIZE, access=mmap.ACCESS_READ)
        self._last = 0.0

    def __call__(self) -> float:
        """Return the current simulated time."""
        while True:
            (before,) = _SEQ.unpack_from(self._map, 0)
            if before % 2:
                continue
            (value,) = _VALUE.unpack_from(self._map, _SEQ.size)
            (after,) = _SEQ.unpack_from(self._map, 0)
            if after == before:
                break
        self._last = max(self._last, value)
        return self._last

    def close(self) -> None:
        """Unmap the clock file."""
        self._map.close()
