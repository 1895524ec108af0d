"""One HTTP request per fresh file (issue 15, target 4): the ``HEAD`` step of a job with no
partial file and no recorded ``HEAD`` opens the ``GET`` of the body, records from its
status and headers what a ``HEAD`` request records, and ``STREAM`` reads the body from the
same response once ``HEAD_DONE``, ``STREAMING`` and its own start are durable.

What is proven here: a fresh file costs exactly one request; the recorded ``HEAD`` result
is the one a ``HEAD`` request gives; a crash anywhere from the open ``GET`` to the
``STREAM`` start leaves a job that a rerun finishes with one plain ``GET`` and the right
bytes (one ranged ``GET`` once the body reached the disk); and the response is closed
(its host slot given back) on every way out, a failed ledger write or a crash included.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest

from impl import failpoint
from impl.download.http import HttpClient
from impl.download.manifest import parse_manifest
from impl.download.pipeline import DownloadHandler
from impl.download.run import download
from impl.download.testserver import FileServer, generated_bytes
from impl.outcome import RetryLater
from impl.sqlite.store import SqliteStore
from impl.worker import JobContext
from model import Config
from model.errors import DatabaseFull, LeaseLost
from model.record import JSON, EffectContext, Lease
from model.store import EffectFn
from tests.download.conftest import write_manifest


class _Tracked(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, owner: _Tracking) -> None:
        self._inner = inner
        self._owner = owner
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self._inner

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with self._owner.lock:
                self._owner.open -= 1
        self._inner.close()


class _Tracking(httpx.BaseTransport):
    """The real transport, counting responses received and not yet closed."""

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()
        self.lock = threading.Lock()
        self.open = 0
        self.received = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        assert isinstance(response.stream, httpx.SyncByteStream)
        with self.lock:
            self.open += 1
            self.received += 1
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_Tracked(response.stream, self),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._inner.close()


def _client(cfg: Config, transport: httpx.BaseTransport | None = None) -> HttpClient:
    # One slot per host: a response left open would hold it, and the next request of the
    # test would wait for it (download_host_patience) instead of going through.
    return HttpClient(cfg, backoff_base=0.05, transport=transport, per_host=1)


def _entry(url: str, artifact: str) -> dict[str, object]:
    return {"work_id": "work", "artifact_id": artifact, "url": url}


def _stored(out: Path, body: bytes) -> None:
    sha = hashlib.sha256(body).hexdigest()
    assert (out / "objects" / sha[:2] / sha).read_bytes() == body


def test_a_fresh_file_costs_one_get_and_records_what_a_head_records(
    tmp_path: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    bodies = {f"/f{i}": generated_bytes(i, 30_000 * (i + 1)) for i in range(3)}
    urls = [server.add(p, b, etag=f'"tag-{p[2:]}"') for p, b in bodies.items()]
    moved = server.add("/moved", b"", redirect_to="/f0")
    manifest = write_manifest(
        tmp_path / "m.jsonl",
        [*(_entry(u, u) for u in urls), _entry(moved + "?alias", "moved")],
    )
    transport = _Tracking()
    client = _client(cfg, transport)
    with SqliteStore(tmp_path / "ledger.sqlite", config=cfg) as store:
        summary = download(store, manifest, out, workers=2, config=cfg, client=client)
        heads = {
            str(j.identity["artifact_id"]): [
                e.result for e in store.effects(j.job_id) if e.op == "HEAD"
            ]
            for j in store.jobs()
        }
    assert (summary.succeeded, summary.skipped, summary.failed) == (3, 1, 0)
    for body in bodies.values():
        _stored(out, body)
    assert summary.bytes_received == sum(len(b) for b in bodies.values())
    # Exactly one request per fresh file, a GET without Range; the alias redirected once.
    log = sorted((r.method, r.path, r.range) for r in server.requests())
    assert log == sorted(
        [("GET", p, None) for p in bodies] + [("GET", "/moved?alias", None), ("GET", "/f0", None)]
    )
    assert transport.open == 0
    # What each HEAD result says is what a HEAD request says about the same URL.
    requests_before = len(server.requests())
    for url in [*urls, moved + "?alias"]:
        key = url if url in urls else "moved"
        (result,) = heads[key]
        assert isinstance(result, dict)
        assert result["head"] == client.head(url).to_json()
    # (The comparison asked with real HEAD requests: four, and the alias's redirect hop.)
    assert [r.method for r in server.requests()[requests_before:]] == ["HEAD"] * 5
    client.close()


@pytest.mark.parametrize("refusal", [405, 501])
def test_a_server_that_refuses_head_costs_one_get_too(
    tmp_path: Path, out: Path, cfg: Config, server: FileServer, refusal: int
) -> None:
    """A server refusing HEAD made the old HEAD step fall back to a GET it did not read,
    then GET again; the fresh job's one GET never asks with HEAD."""
    body = generated_bytes(6, 50_000)
    url = server.add("/nohead", body, head_status=refusal)
    manifest = write_manifest(tmp_path / "m.jsonl", [_entry(url, "nohead")])
    client = _client(cfg)
    with SqliteStore(tmp_path / "ledger.sqlite", config=cfg) as store:
        summary = download(store, manifest, out, workers=1, config=cfg, client=client)
    client.close()
    assert (summary.succeeded, summary.failed) == (1, 0)
    assert [(r.method, r.range, r.status) for r in server.requests()] == [("GET", None, 200)]
    _stored(out, body)


def _one_job(
    tmp_path: Path, store: SqliteStore, url: str, *, ttl: float = 30.0
) -> tuple[Path, JobContext]:
    manifest = write_manifest(tmp_path / "m.jsonl", [_entry(url, "a")])
    (entry,) = parse_manifest(manifest).entries
    store.plan("download", entry.identity())
    lease = store.lease_next("test:1:0", ttl=ttl)
    assert lease is not None
    ctx = JobContext(store, lease, lost=threading.Event(), stopping=threading.Event())
    return manifest, ctx


TTL = 1.5
"""The crashed worker's lease: long enough that it cannot expire before the crash on a
loaded machine, short enough that the rerun need not wait long for it."""


# Every crash point from the open GET's HEAD result to the STREAM start: (failpoint,
# hit, the job's state left in the ledger). Hits count from the job's start: HEAD is the
# first effect, and its result transaction also enters HEAD_DONE (then=); STREAMING is
# the first advance of its own.
CRASHES = [
    ("effect.before_record", 1, "PLANNED"),  # the GET open, its HEAD result not yet written
    ("effect_record.before_commit", 1, "PLANNED"),
    ("effect_record.after_commit", 1, "HEAD_DONE"),
    ("advance.before_commit", 1, "HEAD_DONE"),
    ("advance.after_commit", 1, "STREAMING"),
    ("effect_start.before_commit", 2, "STREAMING"),
    ("effect.after_start", 2, "STREAMING"),
]


@pytest.mark.parametrize(("point", "hit", "left"), CRASHES)
def test_a_crash_between_the_head_result_and_the_stream_start_resumes_with_one_get(
    tmp_path: Path, out: Path, cfg: Config, server: FileServer, point: str, hit: int, left: str
) -> None:
    body = generated_bytes(3, 200_000)
    url = server.add("/a.bin", body)
    transport = _Tracking()
    client = _client(cfg, transport)
    handler = DownloadHandler(str(out), config=cfg, client=client)
    with SqliteStore(tmp_path / "ledger.sqlite", config=cfg) as store:
        manifest, ctx = _one_job(tmp_path, store, url, ttl=TTL)
        job_id = ctx.lease.job_id
        failpoint.arm(point, on_hit=hit)
        try:
            with pytest.raises(failpoint.Crash) as crashed:
                handler(ctx)
        finally:
            failpoint.disarm_all()
        # The crash closed the response the HEAD step opened (explicitly: the traceback
        # kept here holds the handler's frames, so no garbage collection closed it).
        assert transport.open == 0
        del crashed
        assert [(r.method, r.range) for r in server.requests()] == [("GET", None)]
        assert store.state(job_id) == left
        part = handler.layout.part_path(job_id)
        assert not part.exists() or part.stat().st_size == 0  # no byte before STREAM ran
        handler.close()
        # The lease expires (the crashed worker is gone); a rerun takes the job over.
        before = len(server.requests())
        threading.Event().wait(TTL + 0.1)
        summary = download(store, manifest, out, workers=1, config=cfg, client=client)
        assert (summary.succeeded, summary.failed) == (1, 0)
        assert store.state(job_id) == "INDEXED"
    # The rerun made its ordinary request: one plain GET (no bytes were on disk).
    assert [(r.method, r.range) for r in server.requests()[before:]] == [("GET", None)]
    _stored(out, body)
    assert transport.open == 0
    client.close()


def test_a_crash_after_the_body_of_the_open_get_is_on_disk_resumes_with_one_ranged_get(
    tmp_path: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    """The body read from the HEAD step's GET is fsynced, then the worker dies before
    STREAM's result is recorded: the rerun asks only for what follows the bytes on disk
    (nothing: the server answers 416 for the whole file) and keeps them."""
    body = generated_bytes(5, 200_000)
    url = server.add("/a.bin", body)
    transport = _Tracking()
    client = _client(cfg, transport)
    handler = DownloadHandler(str(out), config=cfg, client=client)
    with SqliteStore(tmp_path / "ledger.sqlite", config=cfg) as store:
        manifest, ctx = _one_job(tmp_path, store, url, ttl=TTL)
        job_id = ctx.lease.job_id
        failpoint.arm("effect.before_record", on_hit=2)  # STREAM's (HEAD's is the first)
        try:
            with pytest.raises(failpoint.Crash) as crashed:
                handler(ctx)
        finally:
            failpoint.disarm_all()
        assert transport.open == 0
        del crashed
        assert handler.layout.part_path(job_id).read_bytes() == body
        handler.close()
        before = len(server.requests())
        threading.Event().wait(TTL + 0.1)
        summary = download(store, manifest, out, workers=1, config=cfg, client=client)
        assert (summary.succeeded, summary.failed) == (1, 0)
    assert [(r.method, r.range) for r in server.requests()[:before]] == [("GET", None)]
    assert [(r.method, r.range, r.status) for r in server.requests()[before:]] == [
        ("GET", f"bytes={len(body)}-", 416)
    ]
    _stored(out, body)
    client.close()


class _Failing:
    """A real store whose write that enters one state (an ``advance``, or the effect
    whose ``then`` it is), or whose ``STREAM`` start, fails."""

    def __init__(self, store: SqliteStore, *, at: str, error: BaseException) -> None:
        self._store = store
        self._at = at
        self._error = error

    def advance(self, lease: Lease, state: str) -> bool:
        if state == self._at:
            raise self._error
        return self._store.advance(lease, state)

    def run_effect(self, lease: Lease, op: str, fn: EffectFn, **kwargs: Any) -> JSON:
        if op == self._at:
            raise self._error
        if kwargs.get("then") == self._at:
            # The write that records the result and enters the state fails after fn ran
            # (here: as fn returns, so nothing is recorded and the state is not entered).
            def then_fails(ctx: EffectContext) -> JSON:
                fn(ctx)
                raise self._error

            return self._store.run_effect(lease, op, then_fails, **kwargs)
        return self._store.run_effect(lease, op, fn, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def _lost(job: str) -> LeaseLost:
    return LeaseLost(job, 1, 2, "the lease expired", "advance")


@pytest.mark.parametrize("at", ["HEAD_DONE", "STREAMING", "STREAM"])
@pytest.mark.parametrize("error", ["lease lost", "ledger full"])
def test_a_failed_ledger_write_between_head_and_stream_closes_the_response(
    tmp_path: Path, out: Path, cfg: Config, server: FileServer, at: str, error: str
) -> None:
    url = server.add("/a.bin", generated_bytes(4, 300_000))
    transport = _Tracking()
    cfg = attrs.evolve(cfg, download_host_patience=1.0)
    client = _client(cfg, transport)
    handler = DownloadHandler(str(out), config=cfg, client=client, world_delay=0)
    with SqliteStore(tmp_path / "ledger.sqlite", config=cfg) as store:
        _manifest, ctx = _one_job(tmp_path, store, url)
        fault: BaseException = (
            _lost(ctx.lease.job_id) if error == "lease lost" else DatabaseFull("disk full")
        )
        failing = JobContext(
            _Failing(store, at=at, error=fault),
            ctx.lease,
            lost=threading.Event(),
            stopping=threading.Event(),
        )
        expected = LeaseLost if error == "lease lost" else RetryLater
        with pytest.raises(expected) as failed:
            handler(failing)
    handler.close()
    assert transport.received == 1
    # Closed by the handler itself: ``failed`` keeps the traceback, and with it the
    # handler's frames, alive, so garbage collection cannot have closed it.
    assert transport.open == 0
    del failed
    part = handler.layout.part_path(ctx.lease.job_id)
    assert not part.exists() or part.stat().st_size == 0
    # The host's one slot is free again: the next request goes through at once.
    assert client.head(url).status == 200
    client.close()
