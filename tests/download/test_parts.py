"""The pure parts: header parsing and the content-addressed store."""

from __future__ import annotations

import hashlib
import shutil
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
