"""Crash and resume: a worker process SIGKILLed mid-stream, and a partial file found at
``HEAD_DONE``. The rerun must continue the bytes on disk with a Range request and end
with exactly the right bytes."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import attrs
import pytest

from impl.download.demo import _spawn
from impl.download.manifest import parse_manifest
from impl.download.pipeline import DownloadHandler
from impl.download.run import Progress, download
from impl.download.testserver import FileServer, generated_bytes
from impl.sqlite.store import SqliteStore
from impl.worker import JobContext
from model import Config, Event
from tests.download.conftest import write_manifest

pytestmark = pytest.mark.xdist_group("processes")


def _stored_ok(out: Path, body: bytes) -> None:
    sha = hashlib.sha256(body).hexdigest()
    assert (out / "objects" / sha[:2] / sha).read_bytes() == body


def _wait_for_part(out: Path, size: int, timeout: float = 30.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        parts = list((out / ".partial").glob("*.part")) if (out / ".partial").exists() else []
        if parts and parts[0].stat().st_size >= size:
            return parts[0]
        time.sleep(0.02)
    raise AssertionError(f"no partial file reached {size} bytes in {timeout} s")


def _at_head_done(
    store: SqliteStore, manifest: Path, out: Path, cfg: Config, *, part: bytes
) -> str:
    """Plan the manifest's one job, record its HEAD and HEAD_DONE, hand it back, and leave
    ``part`` as its partial file, as a worker that died after HEAD_DONE would; return its id."""
    (entry,) = parse_manifest(manifest).entries
    handler = DownloadHandler(str(out), config=cfg)
    job_id = store.plan("download", entry.identity())
    lease = store.lease_next("test:1:0", ttl=10)
    assert lease is not None
    ctx = JobContext(store, lease, lost=threading.Event(), stopping=threading.Event())
    handler._head(ctx)
    assert ctx.advance("HEAD_DONE")
    store.release(ctx.lease)
    handler.layout.part_path(job_id).write_bytes(part)
    return job_id


def test_sigkill_mid_stream_then_resume_with_range(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    body = generated_bytes(21, 1_500_000)
    url = server.add("/slow", body, rate=400_000)
    manifest = write_manifest(
        tmp_path / "m.jsonl", [{"work_id": "w", "artifact_id": "slow", "url": url}]
    )
    proc = _spawn([str(db), str(manifest), str(out), "1", json.dumps(attrs.asdict(cfg))])
    try:
        part = _wait_for_part(out, 300_000)
    finally:
        proc.kill()
        proc.wait(10)
    on_disk = part.stat().st_size
    assert 0 < on_disk < len(body)
    server.resources["/slow"].rate = None
    waits: list[str] = []
    with SqliteStore(db, config=cfg) as store:
        (job,) = store.jobs(kind="download")
        assert job.state == "STREAMING"
        summary = download(
            store,
            manifest,
            out,
            workers=1,
            config=cfg,
            progress=Progress(on_wait=lambda m, _s: waits.append(m)),
        )
        history = [e.event for e in store.history(job.job_id)]
    assert summary.succeeded == 1
    _stored_ok(out, body)
    ranged = [r for r in server.requests("/slow", "GET") if r.range]
    assert len(ranged) == 1
    start = int(ranged[0].range.removeprefix("bytes=").rstrip("-"))
    assert start == on_disk  # every byte on disk was kept, none fetched twice
    assert ranged[0].status == 206
    assert summary.bytes_resumed == start
    assert summary.bytes_received == len(body) - start
    assert Event.EFFECT_IN_DOUBT in history
    assert any("no longer exists" in m for m in waits)
    assert list((out / ".partial").iterdir()) == []


def test_partial_file_at_head_done_enters_resume_ok(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    body = generated_bytes(22, 400_000)
    url = server.add("/half", body)
    manifest = write_manifest(
        tmp_path / "m.jsonl", [{"work_id": "w", "artifact_id": "half", "url": url}]
    )
    with SqliteStore(db, config=cfg) as store:
        job_id = _at_head_done(store, manifest, out, cfg, part=body[:150_000])
        summary = download(store, manifest, out, workers=1, config=cfg)
        moves = [e.detail.get("to") for e in store.history(job_id) if e.event == Event.ADVANCED]
    assert summary.succeeded == 1
    assert moves == ["HEAD_DONE", "RESUME_OK", "STREAMING", "FINALIZED", "INDEXED"]
    (get,) = server.requests("/half", "GET")
    assert get.range == "bytes=150000-"
    assert get.status == 206
    _stored_ok(out, body)


def test_a_whole_partial_file_is_finished_from_disk_after_a_416(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    """Every byte of the file is on disk but its STREAM result was never recorded: the
    ranged request for the rest is answered 416 with ``bytes */N``, N being the bytes on
    disk, and the file is finished from disk instead of fetched again."""
    body = generated_bytes(23, 300_000)
    url = server.add("/whole", body)
    manifest = write_manifest(
        tmp_path / "m.jsonl", [{"work_id": "w", "artifact_id": "whole", "url": url}]
    )
    with SqliteStore(db, config=cfg) as store:
        job_id = _at_head_done(store, manifest, out, cfg, part=body)
        summary = download(store, manifest, out, workers=1, config=cfg)
        moves = [e.detail.get("to") for e in store.history(job_id) if e.event == Event.ADVANCED]
    assert summary.succeeded == 1
    assert (summary.bytes_received, summary.bytes_resumed) == (0, len(body))
    assert moves == ["HEAD_DONE", "RESUME_OK", "STREAMING", "FINALIZED", "INDEXED"]
    (get,) = server.requests("/whole", "GET")
    assert (get.range, get.status) == (f"bytes={len(body)}-", 416)
    _stored_ok(out, body)


def test_a_416_for_another_length_restarts_from_zero(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    """A partial file longer than the file (the server's copy shrank under the same
    validator, or the bytes on disk are not what they seem) is not taken as whole: the
    416 names another length, and the file is fetched again from zero."""
    body = generated_bytes(24, 200_000)
    url = server.add("/shrunk", body)
    manifest = write_manifest(
        tmp_path / "m.jsonl", [{"work_id": "w", "artifact_id": "shrunk", "url": url}]
    )
    with SqliteStore(db, config=cfg) as store:
        _at_head_done(store, manifest, out, cfg, part=body + b"trailing garbage")
        summary = download(store, manifest, out, workers=1, config=cfg)
    assert summary.succeeded == 1
    asked = [(r.range, r.status) for r in server.requests("/shrunk", "GET")]
    assert asked == [(f"bytes={len(body) + 16}-", 416), (None, 200)]
    _stored_ok(out, body)
