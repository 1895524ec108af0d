"""The pure parts: header parsing and the content-addressed store."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from impl.download import cas
from impl.download.cas import Layout
from impl.download.errors import ArtifactMissing
from impl.download.http import RETRY_AFTER_CAP, parse_content_range, parse_retry_after
from model.errors import InvalidInput


def test_retry_after_seconds_dates_and_cap() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("100000") == RETRY_AFTER_CAP
    assert parse_retry_after("Thu, 01 Jan 1970 00:00:10 GMT", now=5.0) == 5.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_content_range_parsing() -> None:
    assert parse_content_range("bytes 10-19/100") == (10, 19, 100)
    assert parse_content_range("bytes 10-19/*") == (10, 19, None)
    assert parse_content_range("items 1-2/3") is None


def test_finalize_is_idempotent_and_stores_identical_bytes_once(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "out")
    layout.ensure()
    data = b"hello" * 1000
    sha = hashlib.sha256(data).hexdigest()
    layout.part_path("a" * 64).write_bytes(data)
    first = layout.finalize("a" * 64, sha, len(data))
    assert not first.existed
    assert layout.finalize("a" * 64, sha, len(data)).existed  # a replay
    layout.part_path("b" * 64).write_bytes(data)
    assert layout.finalize("b" * 64, sha, len(data)).existed  # another artifact, same bytes
    assert not layout.part_path("b" * 64).exists()
    assert [p.name for p in (tmp_path / "out" / "objects").rglob("*") if p.is_file()] == [sha]


def test_finalize_refuses_a_changed_or_missing_partial_file(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "out")
    layout.ensure()
    sha = hashlib.sha256(b"right").hexdigest()
    with pytest.raises(ArtifactMissing, match="missing"):
        layout.finalize("c" * 64, sha, 5)
    layout.part_path("c" * 64).write_bytes(b"wrong")
    with pytest.raises(ArtifactMissing, match="changed on disk"):
        layout.finalize("c" * 64, sha, 5)


@pytest.mark.parametrize("name", ["../../etc/passwd", "A" * 64, "", "x" * 64])
def test_paths_are_built_only_from_hashes(tmp_path: Path, name: str) -> None:
    layout = Layout(tmp_path)
    with pytest.raises(InvalidInput):
        layout.part_path(name)
    with pytest.raises(InvalidInput):
        layout.object_path(name)


def _same_shard(count: int) -> list[bytes]:
    """``count`` different bodies whose hashes share their first two hex digits."""
    found: dict[str, list[bytes]] = {}
    n = 0
    while True:
        data = f"body {n}".encode()
        n += 1
        group = found.setdefault(hashlib.sha256(data).hexdigest()[:2], [])
        group.append(data)
        if len(group) == count:
            return group


def test_finalize_fsyncs_the_objects_directory_once_per_new_shard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    real = cas.fsync_dir

    def spy(path: Path) -> None:
        synced.append(path)
        real(path)

    monkeypatch.setattr(cas, "fsync_dir", spy)
    layout = Layout(tmp_path / "out")
    layout.ensure()
    bodies = _same_shard(3)
    for n, data in enumerate(bodies):
        job = str(n) * 64
        layout.part_path(job).write_bytes(data)
        assert not layout.finalize(job, hashlib.sha256(data).hexdigest(), len(data)).existed
    # The shard's entry was made durable once; each rename still syncs its directory
    # and the partial directory.
    assert synced.count(layout.objects) == 1
    shard = layout.object_path(hashlib.sha256(bodies[0]).hexdigest()).parent
    assert synced.count(shard) == 3
    assert synced.count(layout.partial) == 3
    # A new Layout (a new run or process) knows nothing and syncs again.
    other = _same_shard(4)[3]
    fresh = Layout(tmp_path / "out")
    fresh.part_path("9" * 64).write_bytes(other)
    fresh.finalize("9" * 64, hashlib.sha256(other).hexdigest(), len(other))
    assert synced.count(layout.objects) == 2


def test_finalize_makes_a_removed_shard_again(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "out")
    layout.ensure()
    first, second = _same_shard(2)
    layout.part_path("a" * 64).write_bytes(first)
    done = layout.finalize("a" * 64, hashlib.sha256(first).hexdigest(), len(first))
    shutil.rmtree((layout.root / done.path).parent)  # an operator removed the shard
    layout.part_path("b" * 64).write_bytes(second)
    sha = hashlib.sha256(second).hexdigest()
    assert not layout.finalize("b" * 64, sha, len(second)).existed
    assert layout.object_path(sha).read_bytes() == second


def test_concurrent_finalizes_share_directory_fsyncs_begun_after_their_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sixteen threads finalise at once (two of them into one shard). Each returns
    only after an fsync of its shard and of the partial directory that *began after*
    its rename had completed (an fsync already running began too early), and the
    threads share those fsyncs: fewer than one per file."""
    events: list[tuple[str, str, Path | None]] = []  # (what, who, directory), in order
    lock = threading.Lock()
    real_fsync_dir, real_replace = cas.fsync_dir, os.replace

    def log(what: str, who: str, directory: Path | None = None) -> None:
        with lock:
            events.append((what, who, directory))

    def fsync_dir(path: Path) -> None:
        me = f"fsync {threading.get_ident()} {time.monotonic_ns()}"
        log("begin", me, path)
        time.sleep(0.005)  # long enough for the other threads' renames to pile up
        real_fsync_dir(path)
        log("end", me, path)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        real_replace(src, dst)
        log("renamed", Path(src).name.removesuffix(".part"))

    monkeypatch.setattr(cas, "fsync_dir", fsync_dir)
    monkeypatch.setattr(os, "replace", replace)
    layout = Layout(tmp_path / "out")
    layout.ensure()
    bodies = list(dict.fromkeys(_same_shard(2) + [f"other {n}".encode() for n in range(14)]))
    jobs = [f"{n:064x}" for n in range(len(bodies))]
    for job, data in zip(jobs, bodies, strict=True):
        layout.part_path(job).write_bytes(data)
    start = threading.Barrier(len(jobs))
    errors: list[BaseException] = []

    def finalize(job: str, data: bytes) -> None:
        try:
            start.wait(10)
            layout.finalize(job, hashlib.sha256(data).hexdigest(), len(data))
            log("returned", job)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [
        threading.Thread(target=finalize, args=(job, data))
        for job, data in zip(jobs, bodies, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    at = {(what, who): n for n, (what, who, _d) in enumerate(events)}
    for job, data in zip(jobs, bodies, strict=True):
        shard = layout.object_path(hashlib.sha256(data).hexdigest()).parent
        renamed, returned = at[("renamed", job)], at[("returned", job)]
        for directory in (shard, layout.partial):
            covering = [
                who
                for n, (what, who, d) in enumerate(events)
                if what == "begin" and d == directory and n > renamed
                if at[("end", who)] < returned
            ]
            assert covering, (
                f"{job[-4:]} returned before an fsync of {directory.name} begun after its rename"
            )
    partial_fsyncs = [e for e in events if e[0] == "begin" and e[2] == layout.partial]
    assert len(partial_fsyncs) < len(jobs), "the threads did not share the partial dir's fsyncs"


def test_a_failed_shared_fsync_counts_for_nobody(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads arrive while an fsync runs and wait for the next; one of them makes
    it and it fails: that one gets the error, and the other does not return as if the
    fsync had completed, it makes its own."""
    calls: list[str] = []
    begun, waiting = threading.Event(), threading.Event()
    real = cas.fsync_dir

    def fsync_dir(path: Path) -> None:
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            begun.set()
            waiting.wait(10)
        elif len(calls) == 2:
            raise OSError(5, "Input/output error")
        real(path)

    monkeypatch.setattr(cas, "fsync_dir", fsync_dir)
    dir_sync = cas.DirSync(tmp_path)
    failed: list[str] = []

    def sync() -> None:
        try:
            dir_sync.sync()
        except OSError:
            failed.append(threading.current_thread().name)

    first = threading.Thread(target=sync, name="first")
    first.start()
    assert begun.wait(10)
    later = [threading.Thread(target=sync, name=name) for name in ("second", "third")]
    for thread in later:
        thread.start()
    time.sleep(0.1)  # both wait for the next fsync by now
    waiting.set()
    for thread in [first, *later]:
        thread.join(10)
    assert calls[0] == "first"
    assert len(calls) == 3, calls
    assert failed == [calls[1]]
    assert calls[2] != calls[1]
