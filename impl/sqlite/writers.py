"""The writers' queue of a SQLite ledger: one robust mutex shared by every process.

SQLite admits one writer per file, and a process that meets the write lock can only poll
it (:mod:`impl.sqlite.waiting`). With dozens of processes on one file every try that
finds the lock taken costs CPU that the holder then lacks (bench/README.md, issue 15).
So before ``BEGIN IMMEDIATE`` a write transaction first takes this queue: a
``pthread_mutex_t`` in a small file next to the ledger (``<ledger>-writers``, like
SQLite's ``-wal`` and ``-shm``), mapped shared by every process, made process-shared and
robust. Waiters sleep in the kernel (a futex) and the one woken finds SQLite's lock free.

Why this mutex and not ``flock``: a timed wait (``pthread_mutex_clocklock``), so a
stopped holder (``kill -STOP``, a debugger) makes the others raise ``DatabaseLocked``
after ``busy_timeout`` as before instead of hanging; and robustness, so a holder that
died hands the mutex on (``EOWNERDEAD``) to the next waiter. That holder's transaction
was rolled back by SQLite itself: the mutex is only a queue, SQLite's lock stays the
guard, and correctness never depends on the queue. So wherever it cannot be had (not
Linux/glibc, a read-only directory, an unexpected error code) writers go on without it.

Initialisation races between processes are settled by ``flock`` on the file while the
header is checked and the mutex initialised; the header is written last, so a process
that died half-way leaves a file that the next one initialises again.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from impl import failpoint

log = logging.getLogger("jobledger.sqlite")

SUFFIX = "-writers"
"""Appended to the ledger's path to name the queue's file."""

_MAGIC = b"JLWQ"
_VERSION = 1
_HEADER = struct.Struct("<4sII")
# The mutex at a cache line of its own, with room to spare: glibc's pthread_mutex_t is
# 40 bytes on x86_64 and 48 on aarch64.
_MUTEX_OFFSET = 64
_MUTEX_ROOM = 64
_ATTR_ROOM = 16
_SIZE = _MUTEX_OFFSET + _MUTEX_ROOM

# Linux/glibc values (asm-generic errno.h, pthread.h, time.h).
_EBUSY = 16
_ETIMEDOUT = 110
_EOWNERDEAD = 130
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1
_CLOCK_MONOTONIC = 1

AFTER_ACQUIRE = failpoint.WRITERS_POINTS[0]


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Pthread:
    """The pthread functions the queue calls, looked up once per process."""

    def __init__(self) -> None:
        # CDLL calls release the interpreter lock, so a waiter blocks only its thread;
        # the calls that never block keep it (PyDLL): with dozens of threads in one
        # process, every release of the interpreter lock is a likely thread switch.
        libc = ctypes.CDLL(None)
        held = ctypes.PyDLL(None)
        ptr, timespec = ctypes.c_void_p, ctypes.POINTER(_Timespec)
        self.attr_init = self._fn(held, "pthread_mutexattr_init", ptr)
        self.attr_pshared = self._fn(held, "pthread_mutexattr_setpshared", ptr, ctypes.c_int)
        self.attr_robust = self._fn(held, "pthread_mutexattr_setrobust", ptr, ctypes.c_int)
        self.attr_destroy = self._fn(held, "pthread_mutexattr_destroy", ptr)
        self.init = self._fn(held, "pthread_mutex_init", ptr, ptr)
        self.trylock = self._fn(held, "pthread_mutex_trylock", ptr)
        self.unlock = self._fn(held, "pthread_mutex_unlock", ptr)
        self.consistent = self._fn(held, "pthread_mutex_consistent", ptr)
        # pthread_mutex_clocklock (glibc >= 2.30) waits on the monotonic clock, which a
        # change of the wall clock does not move; older ones only have timedlock.
        self.clocklock = None
        self.timedlock = None
        if hasattr(libc, "pthread_mutex_clocklock"):
            self.clocklock = self._fn(libc, "pthread_mutex_clocklock", ptr, ctypes.c_int, timespec)
        else:
            self.timedlock = self._fn(libc, "pthread_mutex_timedlock", ptr, timespec)

    @staticmethod
    def _fn(libc: ctypes.CDLL, name: str, *argtypes: object) -> Callable[..., int]:
        fn = getattr(libc, name)  # AttributeError where it is missing
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
        return fn  # type: ignore[no-any-return]

    def lock_until(self, mutex: int, seconds: float) -> int:
        """Wait for ``mutex`` for at most ``seconds``; return pthread's error code."""
        if self.clocklock is not None:
            at = time.monotonic() + max(seconds, 0.0)
            clock = _CLOCK_MONOTONIC
        else:
            at = time.time() + max(seconds, 0.0)
            clock = -1
        sec = int(at)
        spec = _Timespec(sec, int((at - sec) * 1e9))
        if self.clocklock is not None:
            return int(self.clocklock(mutex, clock, ctypes.byref(spec)))
        assert self.timedlock is not None
        return int(self.timedlock(mutex, ctypes.byref(spec)))


_PTHREAD: list[_Pthread | None] = []


def _pthread() -> _Pthread | None:
    if not _PTHREAD:
        try:
            _PTHREAD.append(_Pthread())
        except (OSError, AttributeError) as exc:
            log.debug("no process-shared writers' queue here (%s): polling only", exc)
            _PTHREAD.append(None)
    return _PTHREAD[0]


class WritersQueue:
    """The writers' queue of one ledger file, mapped into this process.

    One thread of a process at a time may hold it (the caller's in-process gate sees to
    that), and the thread that acquired it must be the one that releases it.
    """

    __slots__ = ("_map", "_mutex", "_pt", "_view", "path", "recovered", "usable")

    def __init__(self, path: Path, pt: _Pthread, mapped: mmap.mmap) -> None:
        self.path = path
        self._pt = pt
        self._map = mapped
        # A ctypes view pins the mapping (mmap refuses to close while it is exported).
        self._view = ctypes.c_char.from_buffer(mapped, _MUTEX_OFFSET)
        self._mutex = ctypes.addressof(self._view)
        self.usable = True
        """False once an unexpected error made this process give the queue up."""
        self.recovered = 0
        """How often this process took the queue over from a holder that had died."""

    def acquire(self, timeout: float) -> bool:
        """Take the queue, waiting at most ``timeout`` seconds.

        Returns:
            False if it stayed held that long; True if the caller may go on to begin
            its transaction: it then holds the queue, unless an unexpected error just
            made this process give the queue up (``usable`` is then False and
            :meth:`release` does nothing).
        """
        pt = self._pt
        code = int(pt.trylock(self._mutex))
        if code == _EBUSY:
            code = pt.lock_until(self._mutex, timeout)
        if code == 0:
            return True
        if code == _ETIMEDOUT:
            return False
        if code == _EOWNERDEAD:
            # The holder died holding it; SQLite rolled its transaction back. The mutex
            # is ours now, and usable again once marked consistent.
            self.recovered += 1
            if int(pt.consistent(self._mutex)) == 0:
                return True
            code = -1
        self._give_up(code)
        return True

    def release(self) -> None:
        """Hand the queue to the next waiter."""
        if self.usable:
            code = int(self._pt.unlock(self._mutex))
            if code != 0:
                self._give_up(code)

    def _give_up(self, code: int) -> None:
        self.usable = False
        log.warning(
            "the writers' queue %s failed (pthread error %s): this process writes without "
            "it, waiting for SQLite's lock by polling; delete the file when no process uses "
            "the ledger to start afresh",
            self.path,
            os.strerror(code) if code > 0 else code,
        )


_QUEUES: dict[str, WritersQueue | None] = {}
_QUEUES_LOCK = threading.Lock()


def queue_for(path: Path) -> WritersQueue | None:
    """The writers' queue of the ledger at ``path`` in this process, or None where it
    cannot be had (no pthread functions, a directory or file that cannot be written)."""
    key = os.path.realpath(path)
    with _QUEUES_LOCK:
        if key in _QUEUES:
            return _QUEUES[key]
        queue = _open(Path(key + SUFFIX))
        _QUEUES[key] = queue
        return queue


def _open(path: Path) -> WritersQueue | None:
    pt = _pthread()
    if pt is None:
        return None
    try:
        mapped = _map(path, pt)
    except OSError as exc:
        log.debug("no writers' queue at %s (%s): polling only", path, exc)
        return None
    return WritersQueue(path, pt, mapped)


def _mode_of_ledger(path: Path) -> int:
    # The file gets the ledger's permissions, as SQLite gives them to -wal and -shm, so
    # whoever may write the ledger may queue for it.
    ledger = str(path)[: -len(SUFFIX)]
    try:
        return os.stat(ledger).st_mode & 0o666
    except OSError:
        return 0o600


def _map(path: Path, pt: _Pthread) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _mode_of_ledger(path))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_size < _SIZE:
            os.ftruncate(fd, _SIZE)
        mapped = mmap.mmap(fd, _SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            if _HEADER.unpack_from(mapped, 0) != (_MAGIC, _VERSION, _MUTEX_OFFSET):
                _initialise(mapped, pt)
        except BaseException:
            mapped.close()
            raise
        return mapped
    finally:
        # Explicitly: mmap keeps a duplicate of fd, which would keep the flock held.
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _initialise(mapped: mmap.mmap, pt: _Pthread) -> None:
    mapped[:_SIZE] = bytes(_SIZE)
    attr = ctypes.create_string_buffer(_ATTR_ROOM)
    view = ctypes.c_char.from_buffer(mapped, _MUTEX_OFFSET)
    try:
        codes = (
            pt.attr_init(attr),
            pt.attr_pshared(attr, _PTHREAD_PROCESS_SHARED),
            pt.attr_robust(attr, _PTHREAD_MUTEX_ROBUST),
            pt.init(ctypes.addressof(view), attr),
        )
        pt.attr_destroy(attr)
    finally:
        del view
    failed = [c for c in codes if c != 0]
    if failed:
        raise OSError(failed[0], f"pthread mutex initialisation: {os.strerror(failed[0])}")
    # Last: a file whose header is written holds an initialised mutex.
    _HEADER.pack_into(mapped, 0, _MAGIC, _VERSION, _MUTEX_OFFSET)


def _forget_in_child() -> None:
    # A queue held by a parent's thread at fork time is not the child's to release; the
    # child maps its own (the same file, so the same mutex).
    global _QUEUES_LOCK  # noqa: PLW0603 - a lock held at fork time is replaced, not reused
    _QUEUES.clear()
    _QUEUES_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)
