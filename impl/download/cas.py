"""The content-addressed store under the output directory, and its partial files.

Layout (every name derives from a job id or a SHA-256, never from a manifest's ids or
URLs, so nothing can be written outside the output directory)::

    OUT/.partial/<job_id>.part             bytes being streamed for one job
    OUT/objects/<sha[:2]>/<sha256>         finished artifacts, one file per distinct content
    OUT/index.sqlite, OUT/index.jsonl      the artifact index (see ``index.py``)

Finalising is crash-safe and idempotent: the partial file is fsynced, renamed into place
with ``os.replace`` and the directory fsynced; when the object already holds the same
bytes the partial file is simply removed, so identical content is stored once. Handler
threads finalising at once share their directory fsyncs (:class:`DirSync`).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from pathlib import Path

from attrs import frozen

from impl.download.errors import ArtifactMissing
from model.errors import InvalidInput

PARTIAL_DIR = ".partial"
OBJECTS_DIR = "objects"
PART_SUFFIX = ".part"
CHUNK = 1024 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _check_hex(value: str, what: str) -> str:
    if not isinstance(value, str) or not _HEX64.match(value):
        raise InvalidInput(
            f"{what} must be 64 lowercase hex digits, got {value!r}; file names are built "
            "only from hashes"
        )
    return value


def fsync_dir(path: Path) -> None:
    """Flush a directory entry change (a rename or a new file) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirSync:
    """The fsyncs of one directory, shared by the threads that need one at once.

    :meth:`sync` returns once an fsync of the directory that *began after* it was
    called has completed: such an fsync covers every change of the directory's entries
    made before the call (a rename, a new file or directory). An fsync already running
    when it is called began too early and does not count; the callers that arrive while
    one runs all wait for the next, and one of them makes it. Numbered in the order
    they begin (one at a time), so "began after" is a comparison of numbers. With 64
    handler threads finalising, over 40% of the partial directory's fsyncs and about
    half of the objects directory's began while another was in flight (bench/README.md).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cond = threading.Condition(threading.Lock())
        self._begun = 0  # fsyncs begun so far; the one running, if any, is number _begun
        self._done = 0  # the number of the last fsync that completed
        self._running = False

    def sync(self) -> None:
        """Return once an fsync of the directory begun after this call has completed.

        Raises:
            OSError: the fsync this call made failed (a caller that waited for it then
                makes its own).
        """
        with self._cond:
            wanted = self._begun + 1
            while self._done < wanted:
                if self._running:
                    self._cond.wait()
                    continue
                self._begun += 1
                number = self._begun
                self._running = True
                completed = False
                self._cond.release()
                try:
                    fsync_dir(self.path)
                    completed = True
                finally:
                    self._cond.acquire()
                    self._running = False
                    if completed:
                        self._done = number
                    self._cond.notify_all()


def hash_file(path: Path) -> tuple[str, int]:
    """Return the SHA-256 hex and the size of the file at ``path``."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


@frozen
class Finalized:
    """The outcome of :meth:`Layout.finalize`: where the object is and whether it existed."""

    path: str
    existed: bool


class Layout:
    """Paths under one output directory, all derived from job ids and content hashes."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.root = Path(out_dir).resolve()
        self.partial = self.root / PARTIAL_DIR
        self.objects = self.root / OBJECTS_DIR
        # Shard directories whose entry in objects/ this object has fsynced: a later
        # finalize into one of them needs no fsync of objects/ again (one in five of a
        # file's fsyncs). Only after the fsync returned, so a thread that finds a shard
        # here never relies on an entry still in flight; a new process starts empty.
        self._durable_shards: set[str] = set()
        self._syncs: dict[Path, DirSync] = {}
        self._syncs_lock = threading.Lock()

    def ensure(self) -> None:
        """Create the output, partial and objects directories if missing."""
        for directory in (self.root, self.partial, self.objects):
            directory.mkdir(parents=True, exist_ok=True)

    def part_path(self, job_id: str) -> Path:
        """Return the partial file of job ``job_id``."""
        return self.partial / f"{_check_hex(job_id, 'job id')}{PART_SUFFIX}"

    def object_path(self, sha256: str) -> Path:
        """Return where content with hash ``sha256`` is stored."""
        sha = _check_hex(sha256, "sha256")
        return self.objects / sha[:2] / sha

    def _sync(self, directory: Path) -> None:
        """fsync ``directory``, sharing the fsync with other threads (:class:`DirSync`)."""
        with self._syncs_lock:
            dir_sync = self._syncs.get(directory)
            if dir_sync is None:
                dir_sync = self._syncs[directory] = DirSync(directory)
        dir_sync.sync()

    def relative(self, path: Path) -> str:
        """Return ``path`` relative to the output directory, with ``/`` separators."""
        return path.relative_to(self.root).as_posix()

    def part_jobs(self) -> dict[str, Path]:
        """Return the partial files on disk, by job id (files with other names ignored)."""
        out: dict[str, Path] = {}
        if not self.partial.is_dir():
            return out
        for entry in self.partial.iterdir():
            stem = entry.name.removesuffix(PART_SUFFIX)
            if entry.name.endswith(PART_SUFFIX) and _HEX64.match(stem) and entry.is_file():
                out[stem] = entry
        return out

    def object_ok(self, sha256: str, size: int | None = None) -> bool:
        """Return True if the object for ``sha256`` exists and holds exactly those bytes."""
        path = self.object_path(sha256)
        if not path.is_file():
            return False
        if size is not None and path.stat().st_size != size:
            return False
        return hash_file(path)[0] == sha256

    def finalize(self, job_id: str, sha256: str, size: int) -> Finalized:
        """Move job ``job_id``'s partial file into the object store as ``sha256``.

        Idempotent: when the object already holds these bytes (a replay, or another
        artifact with identical content) the partial file is removed and nothing is
        copied.

        Raises:
            ArtifactMissing: the partial file is gone or holds other bytes, and no object
                with this hash exists.
        """
        target = self.object_path(sha256)
        part = self.part_path(job_id)
        if self.object_ok(sha256, size):
            part.unlink(missing_ok=True)
            return Finalized(self.relative(target), existed=True)
        if not part.is_file():
            raise ArtifactMissing(
                f"job {job_id}: the partial file {self.relative(part)} recorded as streamed "
                f"({size} bytes, sha256 {sha256}) is missing and no object holds those bytes; "
                "the job must be fetched again (`jobledger retry` after it fails)"
            )
        found, found_size = hash_file(part)
        if found != sha256 or found_size != size:
            raise ArtifactMissing(
                f"job {job_id}: the partial file {self.relative(part)} holds {found_size} "
                f"bytes with sha256 {found}, but {size} bytes with sha256 {sha256} were "
                "recorded; it changed on disk, the job must be fetched again"
            )
        with part.open("rb+") as handle:
            os.fsync(handle.fileno())
        shard = target.parent.name
        if shard not in self._durable_shards:
            self._make_shard(target.parent)
        try:
            os.replace(part, target)
        except FileNotFoundError:
            if not part.is_file():
                raise
            # The shard directory was removed under us: make it (durably) again.
            self._durable_shards.discard(shard)
            self._make_shard(target.parent)
            os.replace(part, target)
        self._sync(target.parent)
        self._sync(self.partial)
        return Finalized(self.relative(target), existed=False)

    def _make_shard(self, shard: Path) -> None:
        shard.mkdir(parents=True, exist_ok=True)
        self._sync(self.objects)
        self._durable_shards.add(shard.name)
