"""The artifact index: one connection per thread, kept between calls, closed on request."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

import impl.download.index as index_module
from impl.download.index import Artifact, ArtifactIndex
from model import DatabaseCorrupt


def _artifact(n: int, sha: str) -> Artifact:
    return Artifact(
        job_id=f"job{n}",
        artifact_id=f"a{n}",
        work_id="w",
        url=f"http://127.0.0.1/{n}",
        final_url=f"http://127.0.0.1/{n}",
        sha256=sha,
        size=n,
        content_type=None,
        path=f"objects/{sha}",
    )


def test_threads_share_one_index_and_close_leaves_no_wal(tmp_path: Path) -> None:
    index = ArtifactIndex(tmp_path)
    errors: list[BaseException] = []

    def add(start: int) -> None:
        try:
            for n in range(start, start + 20):
                index.add(_artifact(n, f"sha{n % 7}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i * 20,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    rows = index.all()
    assert sorted(r.job_id for r in rows) == sorted(f"job{n}" for n in range(80))
    # The first row of each hash owns it; every later one points at it.
    firsts = {r.sha256: r.job_id for r in reversed(rows)}
    assert all(
        r.duplicate_of == (None if firsts[r.sha256] == r.job_id else firsts[r.sha256]) for r in rows
    )
    # The threads' connections closed when they ended; this thread's closes now, and the
    # last connection to close checkpoints and removes the WAL.
    assert (tmp_path / "index.sqlite-wal").exists()
    index.close()
    assert not (tmp_path / "index.sqlite-wal").exists()
    # A closed index opens a new connection on its next call.
    assert index.get("job0") == rows[[r.job_id for r in rows].index("job0")]
    index.close()


def test_a_damaged_index_is_typed_and_left_as_it_was(tmp_path: Path) -> None:
    garbage = bytes(range(256)) * 16
    (tmp_path / "index.sqlite").write_bytes(garbage)
    with pytest.raises(DatabaseCorrupt, match="delete it"):
        ArtifactIndex(tmp_path)
    assert (tmp_path / "index.sqlite").read_bytes() == garbage


def test_a_replayed_add_returns_the_first_row(tmp_path: Path) -> None:
    index = ArtifactIndex(tmp_path)
    first = index.add(_artifact(1, "same"))
    again = index.add(_artifact(1, "other"))
    assert again == first
    index.close()
    conn = sqlite3.connect(tmp_path / "index.sqlite")
    try:
        assert conn.execute("SELECT count(*) FROM artifacts").fetchone()[0] == 1
    finally:
        conn.close()


def test_threads_of_one_process_take_turns_without_sqlites_busy_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With no busy timeout, two connections of this process that met at SQLite's write
    # lock would fail at once ("database is locked"): every claim and add succeeding
    # shows the threads queued in-process instead (SQLite's busy handler polls in sleeps
    # of up to 100 ms, which every file of a 64-thread download waited through).
    monkeypatch.setattr(index_module, "BUSY_TIMEOUT_MS", 0)
    index = ArtifactIndex(tmp_path)
    errors: list[BaseException] = []

    def work(start: int) -> None:
        try:
            for n in range(start, start + 25):
                assert index.claim(f"key{n}", f"job{n}", f"http://127.0.0.1/{n}") == f"job{n}"
                index.add(_artifact(n, f"sha{n}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i * 25,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[:3]
    assert len(index.all()) == 16 * 25
    index.close()
