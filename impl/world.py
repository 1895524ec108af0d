"""Faults of the world, not of the job: a full disk, a read-only mount, no file handles left.

A job should spend an attempt when *it* is wrong (a 404, a checksum that does not match),
not when the machine around it is. This module recognises the second kind:

* an ``OSError`` whose errno says the file system refused (:data:`WORLD_ERRNOS`: ENOSPC,
  EDQUOT, EROFS, EMFILE, ENFILE, EFBIG, EACCES, EPERM), on the output directory;
* :class:`~model.errors.DatabaseFull` and :class:`~model.errors.DatabaseReadOnly` from
  the ledger or the artifact index.

:func:`fault_of` turns either into a :class:`Fault`: what was refused, on which path, how
many bytes were still needed when known, and what to do, as one line for a human. The
download handler then raises :class:`WorldPaused` (a :class:`impl.RetryLater`): the
worker releases the job with a delay and no attempt is spent. ``jobledger download``
goes further and stops the whole run at the first such fault (every other job would meet
the same full disk), ending with :class:`EnvironmentFault` (exit code 4).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import resource
from pathlib import Path

from attrs import frozen

from impl.outcome import RetryLater
from model.errors import DatabaseFull, DatabaseReadOnly, JobledgerError

LEDGER = "the ledger"
"""The path a ledger fault names when the caller does not know the database's."""

WORLD_PAUSE_SECONDS = 60.0
"""How long a job waits after a fault of the world before a worker takes it again."""

WORLD_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EMFILE: "too many open files in this process",
    errno.ENFILE: "too many open files on this system",
    errno.EFBIG: "file size limit reached",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
"""Errnos that say the machine refused, with the words the one-line message uses."""

_ADVICE = {
    errno.ENOSPC: "free space on that file system (or pass another --out)",
    errno.EDQUOT: "free space within your quota (or pass another --out)",
    errno.EROFS: "remount it read-write (or pass another --out)",
    errno.EMFILE: "raise the open-file limit (ulimit -n) or lower --workers",
    errno.ENFILE: "close other programs' files or raise fs.file-max",
    errno.EFBIG: "raise the file size limit (ulimit -f)",
    errno.EACCES: "give this user write permission there (or pass another --out)",
    errno.EPERM: "give this user write permission there (or pass another --out)",
}


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover - the loop returns


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Return the bytes an unprivileged writer may still use on ``path``'s file system
    (the nearest existing ancestor's), or None when it cannot be asked."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        stat = os.statvfs(probe)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


@frozen
class Fault:
    """What the world refused: ``what`` ("disk full", ...), where, and what would fix it.

    Attributes:
        what: the refusal in words (``WORLD_ERRNOS``, or "ledger full"/"ledger read-only").
        path: the file or directory that was being written.
        errno: the OS error number, or None for a ledger error.
        needed: bytes the interrupted file still needed, when known.
        free: bytes free on that file system when the fault was seen, when known.
        advice: what to do.
        detail: the original error text.
    """

    what: str
    path: str
    errno: int | None
    needed: int | None
    free: int | None
    advice: str
    detail: str

    def line(self) -> str:
        """The one line a person reads: what, where, how much, what to do, and that
        nothing is lost."""
        parts = [f"{self.what}: cannot write {self.path}" if self.path else self.what]
        if self.needed is not None:
            parts.append(f"{_size(self.needed)} more needed for this file")
        if self.free is not None and self.errno in (errno.ENOSPC, errno.EDQUOT):
            parts.append(f"{_size(self.free)} free there")
        return (
            "; ".join(parts)
            + f" ({self.detail}). Nothing is lost and no attempt was spent: {self.advice}, "
            "then run the same command again; finished files are not fetched again and "
            "partial files resume"
        )


def is_world_error(exc: BaseException) -> bool:
    """True when ``exc`` is a refusal of the machine, not a fault of the job."""
    if isinstance(exc, DatabaseFull | DatabaseReadOnly):
        return True
    return isinstance(exc, OSError) and exc.errno in WORLD_ERRNOS


def fault_of(
    exc: BaseException, *, path: str | os.PathLike[str] | None = None, needed: int | None = None
) -> Fault | None:
    """Return the :class:`Fault` that ``exc`` reports, or None when it is not one.

    Args:
        exc: an ``OSError``, a ledger ``StorageError``, or an :class:`EnvironmentFault`.
        path: the path being written when the error does not name one.
        needed: bytes the file still needed, when the caller knows.
    """
    if isinstance(exc, EnvironmentFault):
        return exc.fault
    if isinstance(exc, WorldPaused):
        return exc.fault
    if isinstance(exc, DatabaseFull | DatabaseReadOnly):
        full = isinstance(exc, DatabaseFull)
        where = str(path) if path is not None else LEDGER
        return Fault(
            what="database full" if full else "database read-only",
            path=where,
            errno=None,
            needed=None,
            free=free_bytes(path) if path is not None else None,
            advice=(
                "free space where the database lives" if full else "make the database writable"
            ),
            detail=" ".join(str(exc).split()),
        )
    if isinstance(exc, OSError) and exc.errno in WORLD_ERRNOS:
        named: str | os.PathLike[str] | None = exc.filename if exc.filename else path
        shown = os.fsdecode(named) if named is not None else "the output directory"
        return Fault(
            what=WORLD_ERRNOS[exc.errno],
            path=shown,
            errno=exc.errno,
            needed=needed,
            free=free_bytes(shown) if named is not None else None,
            advice=_ADVICE[exc.errno],
            detail=f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}",
        )
    return None


FILE_HANDLES_BASE = 32
"""Open files a download process needs besides its workers (ledger, index, stdio)."""
FILE_HANDLES_PER_WORKER = 8
"""Open files per handler thread, measured about 6: its ledger and index connections
(database, WAL, shared memory), an HTTP connection, a partial file; rounded up."""


def ensure_file_handles(workers: int) -> None:
    """Make sure ``workers`` handler threads can open their files, before any starts.

    Raises the soft ``RLIMIT_NOFILE`` towards the hard one when it is too low (a process
    may do that by itself); when even the hard limit is too low, refuses up front with
    one line, instead of workers failing one by one with "unable to open database file".

    Raises:
        EnvironmentFault: the hard limit is below what ``workers`` need.
    """
    need = FILE_HANDLES_BASE + FILE_HANDLES_PER_WORKER * workers
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    ceiling = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if ceiling > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
    if ceiling >= need:
        return
    fits = max((ceiling - FILE_HANDLES_BASE) // FILE_HANDLES_PER_WORKER, 0)
    raise EnvironmentFault(
        Fault(
            what="too many open files",
            path="",
            errno=errno.EMFILE,
            needed=None,
            free=None,
            advice=(
                f"raise the limit (ulimit -n {need}) or run with --workers {fits}"
                if fits
                else f"raise the limit (ulimit -n {need})"
            ),
            detail=(
                f"--workers {workers} needs about {need} open files, and this process may "
                f"open at most {ceiling} (RLIMIT_NOFILE)"
            ),
        )
    )


LEDGER_RESERVE_BYTES = 1024 * 1024
"""Room a download run keeps beside a file ledger (:class:`LedgerReserve`): enough for
the releases and history entries of the jobs in flight when the disk fills up."""


class LedgerReserve:
    """Room held beside a ledger file so that, once its disk is full, the jobs in flight
    can still be handed back.

    A full disk refuses every write, the release of a job's lease too: the job would keep
    its lease until it expires, and that lease would count as an attempt. So a download
    run on a file ledger holds a file of :data:`LEDGER_RESERVE_BYTES` beside it
    (``<ledger>-reserve.<pid>``, really allocated) and deletes it at the first fault of
    the world, *before* handing the jobs back: the releases fit in the room it leaves.
    The run deletes it at its end too; a file left by a process that died is removed by
    the next run. A PostgreSQL ledger has no file here, and no reserve.

    Args:
        ledger: the ledger's database file.
        size: bytes to hold.
    """

    def __init__(self, ledger: Path, *, size: int = LEDGER_RESERVE_BYTES) -> None:
        self.ledger = ledger
        self.size = size
        self.path = ledger.with_name(f"{ledger.name}-reserve.{os.getpid()}")

    def hold(self) -> None:
        """Allocate the reserve (and remove those of dead processes). In a directory
        that refuses files for another reason than space, do without.

        Raises:
            EnvironmentFault: the disk has not even that much room left.
        """
        for left in self.ledger.parent.glob(f"{glob.escape(self.ledger.name)}-reserve.*"):
            pid = left.name.rsplit(".", 1)[1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                with contextlib.suppress(OSError):  # gone already, or not ours to remove
                    left.unlink()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
            finally:
                os.close(fd)
        except OSError as exc:
            self.free()
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                # A directory the ledger cannot write in (read-only, no permission):
                # run without the reserve; the ledger's own first write reports it.
                return
            fault = fault_of(exc, path=self.ledger, needed=self.size)
            assert fault is not None
            raise EnvironmentFault(
                Fault(
                    what=fault.what,
                    path=str(self.ledger),
                    errno=fault.errno,
                    needed=None,
                    free=fault.free,
                    advice=(
                        f"free at least {_size(self.size)} where the database lives (the "
                        "run keeps that much beside it to hand jobs back if the disk fills)"
                    ),
                    detail=fault.detail,
                )
            ) from exc

    def free(self) -> None:
        """Give the room back (idempotent; safe from any thread; never raises: a
        reserve that cannot be removed leaves the run as it would be without one)."""
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class EnvironmentFault(JobledgerError):
    """The machine refused a write the download needs: a full disk or quota, a read-only
    file system, no file handles left, or a full or read-only ledger.

    Nothing is lost and no attempt is spent; the message says what to do. ``jobledger
    download`` exits 4 with it.
    """

    retryable = True

    def __init__(self, fault: Fault) -> None:
        super().__init__(fault.line())
        self.fault = fault


class WorldPaused(RetryLater):
    """The handler's way to hand a job back after a :class:`Fault` (no attempt spent)."""

    def __init__(self, fault: Fault, delay: float = WORLD_PAUSE_SECONDS) -> None:
        super().__init__(fault.line(), delay=delay)
        self.fault = fault


__all__ = [
    "LEDGER",
    "LEDGER_RESERVE_BYTES",
    "WORLD_ERRNOS",
    "WORLD_PAUSE_SECONDS",
    "EnvironmentFault",
    "Fault",
    "LedgerReserve",
    "WorldPaused",
    "ensure_file_handles",
    "fault_of",
    "free_bytes",
    "is_world_error",
]
