"""The download pipeline against a real local HTTP server and a real SQLite ledger.

Each test gives one of the issue's "Prove" cases its documented outcome, and checks that
nothing was lost or corrupted: every successful artifact is in the object store under its
own hash, and every failure says why.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import attrs
import pytest

from impl.download.cas import Layout
from impl.download.http import HttpClient
from impl.download.index import ArtifactIndex
from impl.download.run import (
    FULL_SCAN_EVERY,
    SCAN_PENDING,
    DownloadSummary,
    Progress,
    _Watch,
    download,
)
from impl.download.testserver import FileServer, generated_bytes
from impl.sqlite.store import SqliteStore
from model import Config
from model.record import JSON, Lease
from model.store import EffectFn, Store
from tests.download.conftest import write_manifest


def _run(
    tmp_path: Path,
    db: Path,
    out: Path,
    cfg: Config,
    entries: list[dict[str, object]],
    *,
    workers: int = 2,
) -> DownloadSummary:
    manifest = write_manifest(tmp_path / "manifest.jsonl", entries)
    client = HttpClient(cfg, backoff_base=0.05)
    try:
        with SqliteStore(db, config=cfg) as store:
            return download(store, manifest, out, workers=workers, config=cfg, client=client)
    finally:
        client.close()


def _entry(url: str, artifact: str, **extra: object) -> dict[str, object]:
    return {"work_id": "work", "artifact_id": artifact, "url": url, **extra}


def _stored(out: Path, body: bytes) -> Path:
    sha = hashlib.sha256(body).hexdigest()
    path = out / "objects" / sha[:2] / sha
    assert path.read_bytes() == body
    return path


def _states(db: Path, cfg: Config) -> dict[str, str]:
    with SqliteStore(db, config=cfg) as store:
        return {str(j.identity["artifact_id"]): j.state for j in store.jobs(kind="download")}


def test_downloads_index_and_export(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    bodies = {f"/f{i}": generated_bytes(i, 70_000 * (i + 1)) for i in range(3)}
    entries = [_entry(server.add(p, b), p) for p, b in bodies.items()]
    summary = _run(tmp_path, db, out, cfg, entries)
    assert (summary.succeeded, summary.failed, summary.exit_code) == (3, 0, 0)
    # The run closed every index connection it opened: the last one took the WAL along.
    assert not (out / "index.sqlite-wal").exists()
    for body in bodies.values():
        _stored(out, body)
    rows = {r.artifact_id: r for r in ArtifactIndex(out).all()}
    assert set(rows) == set(bodies)
    assert rows["/f1"].size == len(bodies["/f1"])
    assert rows["/f1"].sha256 == hashlib.sha256(bodies["/f1"]).hexdigest()
    assert (out / "index.jsonl").read_text().count("\n") == 3
    assert all(r.user_agent and r.user_agent.startswith("jobledger/") for r in server.log)
    assert list((out / ".partial").iterdir()) == []


def test_rerun_after_success_makes_no_http_request(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    entries = [_entry(server.add(f"/r{i}", generated_bytes(i, 50_000)), f"r{i}") for i in range(3)]
    first = _run(tmp_path, db, out, cfg, entries)
    assert first.succeeded == 3
    before = len(server.log)
    again = _run(tmp_path, db, out, cfg, entries)
    assert len(server.log) == before
    assert (again.succeeded, again.failed) == (3, 0)


def test_404_fails_the_job_at_once_and_the_rest_succeed(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    ok = server.add("/ok", b"fine" * 1000)
    entries = [_entry(server.url("/absent"), "gone"), _entry(ok, "ok")]
    summary = _run(tmp_path, db, out, cfg, entries)
    assert (summary.succeeded, summary.failed, summary.exit_code) == (1, 1, 1)
    (failure,) = summary.failures
    assert failure.artifact_id == "gone"
    assert failure.error is not None
    assert "404" in failure.error
    assert len(server.requests("/absent")) == 1  # a 404 is not retried


def test_500_then_success_is_retried(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    body = generated_bytes(5, 40_000)
    url = server.add("/flaky", body, fail_first=[500, 503])
    summary = _run(tmp_path, db, out, cfg, [_entry(url, "flaky")])
    assert summary.succeeded == 1
    _stored(out, body)
    statuses = [r.status for r in server.requests("/flaky")]
    assert statuses[:2] == [500, 503]


def test_429_waits_for_retry_after(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    body = generated_bytes(6, 30_000)
    url = server.add("/busy", body, fail_first=[429], retry_after="1")
    summary = _run(tmp_path, db, out, cfg, [_entry(url, "busy")])
    assert summary.succeeded == 1
    first, second = server.requests("/busy")[:2]
    assert first.status == 429
    assert second.at - first.at >= 0.95
    _stored(out, body)


def test_truncated_body_resumes_with_a_range_request(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    body = generated_bytes(7, 300_000)
    url = server.add("/cut", body, truncate_at=120_000)
    summary = _run(tmp_path, db, out, cfg, [_entry(url, "cut")])
    assert summary.succeeded == 1
    _stored(out, body)
    ranged = [r for r in server.requests("/cut", "GET") if r.range]
    assert ranged
    assert ranged[0].range == "bytes=120000-"
    assert ranged[0].status == 206
    assert summary.bytes_received == len(body)


def test_permanently_truncated_body_fails_without_a_corrupt_object(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    body = generated_bytes(8, 100_000)
    url = server.add("/short", body, truncate_at=50_000, truncate_times=10**6, accept_ranges=False)
    cfg = attrs.evolve(cfg, max_attempts=2)
    summary = _run(tmp_path, db, out, cfg, [_entry(url, "short")])
    assert summary.failed == 1
    assert not list((out / "objects").rglob("*"))
    assert "broke off" in str(summary.failures[0].error)


def test_wrong_content_range_restarts_from_zero(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    body = generated_bytes(9, 200_000)
    url = server.add("/liar", body, truncate_at=80_000, wrong_content_range=True)
    summary = _run(tmp_path, db, out, cfg, [_entry(url, "liar")])
    assert summary.succeeded == 1
    _stored(out, body)
    assert summary.restarts == 1
    gets = server.requests("/liar", "GET")
    assert gets[1].status == 206  # the lie
    assert gets[2].range is None  # the plain restart


def test_server_ignoring_range_restarts_from_zero(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    body = generated_bytes(10, 200_000)
    url = server.add("/deaf", body, truncate_at=90_000, ignore_range=True)
    summary = _run(tmp_path, db, out, cfg, [_entry(url, "deaf")])
    assert summary.succeeded == 1
    _stored(out, body)
    gets = server.requests("/deaf", "GET")
    assert gets[1].range == "bytes=90000-"
    assert gets[1].status == 200
    assert summary.restarts == 1


def test_changed_validator_restarts_from_zero(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    old = generated_bytes(11, 150_000)
    url = server.add("/moving", old, truncate_at=60_000)
    new = generated_bytes(12, 150_000)
    original = server.resources["/moving"]

    # After the first (cut) body, the resource changes: If-Range must not splice them.
    def swap() -> None:
        while not server.requests("/moving", "GET"):
            time.sleep(0.01)
        server.add("/moving", new)

    t = threading.Thread(target=swap)
    t.start()
    summary = _run(tmp_path, db, out, cfg, [_entry(url, "moving")])
    t.join()
    assert original.etag != server.resources["/moving"].etag
    assert summary.succeeded == 1
    gets = server.requests("/moving", "GET")
    assert gets[-1].if_range == original.etag
    assert gets[-1].status == 200
    _stored(out, new)


def test_redirect_loop_fails_the_job(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    url = server.add("/loop", b"", redirect_to="/loop")
    summary = _run(tmp_path, db, out, cfg, [_entry(url, "loop")])
    assert summary.failed == 1
    assert "TooManyRedirects" in str(summary.failures[0].error)
    assert len(server.requests("/loop")) == cfg.download_max_redirects + 1


def test_redirect_is_followed_and_the_final_url_indexed(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    body = generated_bytes(13, 20_000)
    final = server.add("/target", body)
    url = server.add("/moved", b"", redirect_to="/target")
    summary = _run(tmp_path, db, out, cfg, [_entry(url, "moved")])
    assert summary.succeeded == 1
    (row,) = ArtifactIndex(out).all()
    assert row.final_url == final
    assert row.url == url


def test_over_the_size_limit_announced_by_head(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    url = server.add("/huge", generated_bytes(14, 300_000))
    cfg = attrs.evolve(cfg, download_max_bytes=100_000)
    summary = _run(tmp_path, db, out, cfg, [_entry(url, "huge")])
    assert summary.failed == 1
    assert "TooLarge" in str(summary.failures[0].error)
    # The length is read from the headers of the fresh job's one request, the GET: its
    # body is never read (this asserted "no GET" while the question was a separate HEAD).
    assert [(r.method, r.range) for r in server.requests("/huge")] == [("GET", None)]
    assert summary.bytes_received == 0
    assert not list((out / "objects").rglob("*"))
    assert all(p.stat().st_size == 0 for p in (out / ".partial").iterdir())


def test_over_the_size_limit_without_a_length(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    url = server.add("/sneaky", generated_bytes(15, 300_000), hide_length=True)
    cfg = attrs.evolve(cfg, download_max_bytes=100_000)
    summary = _run(tmp_path, db, out, cfg, [_entry(url, "sneaky")])
    assert summary.failed == 1
    assert "TooLarge" in str(summary.failures[0].error)
    assert not list((out / "objects").rglob("*"))
    assert all(p.stat().st_size == 0 for p in (out / ".partial").iterdir())


def test_hostile_ids_write_nothing_outside_out(
    tmp_path: Path, db: Path, cfg: Config, server: FileServer
) -> None:
    """Ids and URLs never become file names: only hashes and job ids do."""
    root = tmp_path / "sandbox"
    out = root / "a" / "b" / "out"
    body = generated_bytes(16, 10_000)
    url = server.add("/x%2F..%2Fetc/passwd", body).replace("/x%2F", "/../../x%2F")
    entries = [
        {"work_id": "../../etc", "artifact_id": "../../etc/passwd", "url": url},
        {"work_id": "/abs", "artifact_id": "/etc/shadow\x00", "url": url + "?x=/../.."},
    ]
    before = set(tmp_path.rglob("*"))
    summary = _run(tmp_path, db, out, cfg, entries)
    after = set(tmp_path.rglob("*")) - before
    outside = [
        p
        for p in after
        if not p.is_relative_to(out) and p.parent != tmp_path and p not in out.parents
    ]
    assert outside == []
    assert summary.succeeded + summary.deduped + summary.skipped == 2
    assert not (root / "etc").exists()
    assert not (tmp_path / "etc").exists()
    names = {p.name for p in out.rglob("*") if p.is_file()}
    assert "passwd" not in names
    assert "shadow" not in names


def test_identical_content_at_two_urls_is_stored_once(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    body = generated_bytes(17, 120_000)
    a = server.add("/one", body)
    b = server.add("/two", body, etag='"other-tag"')
    summary = _run(tmp_path, db, out, cfg, [_entry(a, "one"), _entry(b, "two")], workers=1)
    assert (summary.succeeded, summary.deduped) == (1, 1)
    assert len([p for p in (out / "objects").rglob("*") if p.is_file()]) == 1
    rows = ArtifactIndex(out).all()
    assert rows[0].path == rows[1].path
    assert rows[1].duplicate_of == rows[0].job_id
    assert summary.bytes_stored == len(body)
    assert _states(db, cfg) == {"one": "INDEXED", "two": "DEDUPED"}


def test_same_final_url_is_fetched_once(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    body = generated_bytes(18, 60_000)
    server.add("/real", body)
    a = server.add("/alias-a", b"", redirect_to="/real")
    b = server.add("/alias-b", b"", redirect_to="/real")
    summary = _run(tmp_path, db, out, cfg, [_entry(a, "a"), _entry(b, "b")], workers=1)
    assert (summary.succeeded, summary.skipped) == (1, 1)
    # Each job asks once, with the GET (its headers are the HEAD result); the second one's
    # response is closed unread when the claim names the first: the body is received once.
    # (This asserted one GET while the question was a separate HEAD.)
    assert sorted((r.path, r.method) for r in server.requests()) == [
        ("/alias-a", "GET"),
        ("/alias-b", "GET"),
        ("/real", "GET"),
        ("/real", "GET"),
    ]
    assert summary.bytes_received == len(body)
    assert sorted(_states(db, cfg).values()) == ["INDEXED", "SKIPPED_DUPLICATE"]


def test_checksum_mismatch_fails_and_keeps_nothing(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    url = server.add("/wrong", b"actual bytes")
    entry = _entry(url, "wrong", sha256="0" * 64)
    summary = _run(tmp_path, db, out, cfg, [entry])
    assert summary.failed == 1
    assert "ChecksumMismatch" in str(summary.failures[0].error)
    assert not [p for p in out.rglob("*") if p.is_file() and "objects" in p.parts]
    assert list((out / ".partial").iterdir()) == []


def test_disk_reconcile_refetches_a_lost_object(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    body = generated_bytes(19, 80_000)
    url = server.add("/lost", body)
    assert _run(tmp_path, db, out, cfg, [_entry(url, "lost")]).succeeded == 1
    _stored(out, body).unlink()
    junk = Layout(out).part_path("f" * 64)
    junk.write_bytes(b"orphan")
    again = _run(tmp_path, db, out, cfg, [_entry(url, "lost")])
    assert again.disk.missing
    assert again.disk.parts_removed == ("f" * 64,)
    assert again.repaired == 1
    assert again.failed == 0
    _stored(out, body)
    assert not junk.exists()


@pytest.mark.parametrize("per_host", [1])
def test_per_host_limit_serialises_requests(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer, per_host: int
) -> None:
    urls = [server.add(f"/s{i}", generated_bytes(i, 60_000), rate=600_000) for i in range(3)]
    cfg = attrs.evolve(cfg, download_per_host=per_host)
    summary = _run(
        tmp_path, db, out, cfg, [_entry(u, f"s{i}") for i, u in enumerate(urls)], workers=3
    )
    assert summary.succeeded == 3
    gets = sorted(server.requests(method="GET"), key=lambda r: r.at)
    # With one slot per host, each GET starts only after the previous body was sent.
    for earlier, later in itertools.pairwise(gets):
        assert later.at - earlier.at >= 0.08


def test_stop_releases_the_lease_and_keeps_the_partial_file(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    """What Ctrl-C does: stop after the current chunk, give the job back, keep the bytes."""
    body = generated_bytes(23, 2_000_000)
    url = server.add("/long", body, rate=300_000)
    manifest = write_manifest(tmp_path / "m.jsonl", [_entry(url, "long")])
    stop = threading.Event()
    timer = threading.Timer(1.0, stop.set)
    timer.start()
    with SqliteStore(db, config=cfg) as store:
        summary = download(store, manifest, out, workers=1, config=cfg, stop=stop)
        assert store.leases() == []
        (job,) = store.jobs()
        assert job.state == "STREAMING"
        assert job.attempts == 0  # a graceful stop costs no attempt
    timer.join()
    assert summary.pending == 1
    assert summary.exit_code == 1
    (part,) = (out / ".partial").iterdir()
    assert 0 < part.stat().st_size < len(body)


class _CountingStore:
    """A real store that counts the effects asked of it by op (every call, a replay too,
    is a whole fenced write transaction): ``run_effect``, or ``effect_steps`` when a
    worker's ledger thread drives the effect's steps (impl.ledgerthread)."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self.ops: Counter[str] = Counter()

    def run_effect(self, lease: Lease, op: str, fn: EffectFn, **kwargs: Any) -> JSON:
        self.ops[op] += 1
        return self._store.run_effect(lease, op, fn, **kwargs)

    def effect_steps(self, lease: Lease, op: str, **kwargs: Any) -> Any:
        self.ops[op] += 1
        return self._store.effect_steps(lease, op, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_fresh_job_asks_the_ledger_for_each_effect_once(
    tmp_path: Path, db: Path, out: Path, cfg: Config, server: FileServer
) -> None:
    # The HEAD result is carried through the job's states and the FINALIZE result into
    # INDEX, instead of being replayed from the ledger at each state (that cost three
    # write transactions per file, a fifth of a download's ledger writes).
    entries = [_entry(server.add(f"/c{i}", generated_bytes(i, 40_000)), f"c{i}") for i in range(3)]
    manifest = write_manifest(tmp_path / "manifest.jsonl", entries)
    client = HttpClient(cfg, backoff_base=0.05)
    try:
        with SqliteStore(db, config=cfg) as real:
            counting = _CountingStore(real)
            summary = download(
                cast(Store, counting), manifest, out, workers=2, config=cfg, client=client
            )
    finally:
        client.close()
    assert (summary.succeeded, summary.failed) == (3, 0)
    assert counting.ops == {"HEAD": 3, "STREAM": 3, "FINALIZE": 3, "INDEX": 3}


class _StateCounting:
    """A real store that counts ``state`` reads."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self.reads = 0

    def state(self, job_id: str) -> str:
        self.reads += 1
        return self._store.state(job_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_the_watch_reads_the_front_of_the_pending_jobs_and_all_of_them_now_and_then(
    db: Path, cfg: Config
) -> None:
    total = SCAN_PENDING + 72
    with SqliteStore(db, config=cfg) as real:
        items = [
            {"work_id": "w", "artifact_id": str(n), "canonical_url": f"u{n}"} for n in range(total)
        ]
        ids = real.plan_many("download", items)
        counting = _StateCounting(real)
        watch = _Watch(cast(Store, counting), ids, Progress(), "me")
        assert not watch.tick()  # the first tick reads every job
        assert counting.reads == total
        # A job further on ends early: the next ticks read only the front ...
        real.cancel(ids[-1], "gone")
        for _ in range(FULL_SCAN_EVERY - 1):
            counting.reads = 0
            assert not watch.tick()
            assert counting.reads == SCAN_PENDING
        assert watch.done == 0
        # ... and every FULL_SCAN_EVERY-th reads them all and sees it.
        counting.reads = 0
        assert not watch.tick()
        assert counting.reads == total
        assert watch.done == 1
        for job_id in ids[:-1]:
            real.cancel(job_id, "done")
        assert watch.tick()  # all terminal: the scan reaches the end
        assert watch.done == total
