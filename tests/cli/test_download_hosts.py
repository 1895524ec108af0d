"""Hosts that are down or ask to slow down: their jobs wait, they do not fail.

Real faults on 127.0.0.1, no mocks: a closed port, a server stopped and started again
mid-run, a server that answers 503 for a while, and one that answers 429 with
``Retry-After``. For each: no job FAILED, no attempt spent beyond the lease that
finished the job, the summary names the host, and a rerun makes exactly the requests
still needed.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from impl import open_store
from impl.download.http import HttpClient
from impl.download.run import Progress, download
from impl.download.testserver import FileServer, generated_bytes
from impl.worker import default_worker_name
from model import Config
from tests.cli.conftest import Outcome

KIB = 1024
FAST = [
    "--set",
    "download_breaker_failures=2",
    "--set",
    "download_breaker_cooldown=0.5",
    "--set",
    "download_connect_timeout=1",
    "--set",
    "backoff_base=0.05",
    "--set",
    "download_host_patience=1",
]


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as srv:
        yield srv


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _manifest(tmp_path: Path, urls: list[str]) -> Path:
    path = tmp_path / "urls.txt"
    path.write_text("\n".join(urls) + "\n")
    return path


def _jobs(run: Callable[..., Outcome], db: list[str]) -> dict[str, tuple[str, int]]:
    out = run(*db, "jobs", "--json")
    assert out.code == 0, out.err
    return {
        str(j["identity"]["canonical_url"]).split("/", 2)[2]: (j["state"], j["attempts"])
        for j in json.loads(out.out)
    }


def test_a_closed_port_skips_its_host_while_the_others_finish(
    run: Callable[..., Outcome], tmp_path: Path, server: FileServer
) -> None:
    port = _closed_port()
    down = [f"http://127.0.0.1:{port}/d{i}.bin" for i in range(5)]
    bodies = {f"/u{i}.bin": generated_bytes(i, 20 * KIB) for i in range(2)}
    up = [server.add(path, body) for path, body in bodies.items()]
    path = _manifest(tmp_path, down + up)
    db = ["--db", str(tmp_path / "ledger.sqlite")]
    first = run(*db, *FAST, "download", str(path), "--out", "out", "--workers", "2", "--json")
    assert first.code == 1, first.err  # work left pending: the host is down
    summary = json.loads(first.out)
    assert (summary["succeeded"], summary["failed"], summary["pending"]) == (2, 0, 5)
    (host,) = summary["hosts"]
    assert host["host"] == f"127.0.0.1:{port}"
    assert host["state"] == "open"
    assert host["failed_probes"] >= 1
    assert "ConnectError" in host["last_error"]
    assert host["deferred"] >= 5  # each of its jobs was handed back at least once
    jobs = _jobs(run, db)
    assert {jobs[f"127.0.0.1:{port}/d{i}.bin"] for i in range(5)} == {("PLANNED", 0)}
    # One request per fresh file: the GET whose headers are also the HEAD result.
    assert sorted((r.method, r.path) for r in server.requests()) == sorted(
        ("GET", p) for p in bodies
    )
    # The ledger shows the breaker as this process left it: open, with its last error.
    (row,) = json.loads(run(*db, "status", "--json").out)["breakers"]
    assert (row["host"], row["state"], row["opens"]) == (host["host"], "open", host["opens"])
    assert row["worker"] == default_worker_name()
    assert row["failures"] >= 2
    assert "ConnectError" in row["last_error"]
    assert row["until"] > row["opened_at"]
    plain = run(*db, *FAST, "download", str(path), "--out", "out", "--workers", "2")
    assert plain.code == 1
    assert f"skipped host 127.0.0.1:{port}: circuit open after" in plain.out
    assert "run the same command again when it is back" in plain.out
    assert "Traceback" not in plain.err

    # The host comes back: the rerun fetches exactly its five files, nothing else.
    with FileServer(port=port) as back:
        for i in range(5):
            back.add(f"/d{i}.bin", generated_bytes(100 + i, 10 * KIB))
        again = run(*db, *FAST, "download", str(path), "--out", "out", "--workers", "2")
        assert again.code == 0, again.out + again.err
        assert sorted((r.method, r.path) for r in back.requests()) == sorted(
            ("GET", f"/d{i}.bin") for i in range(5)
        )
    assert len(server.requests()) == 2
    assert set(_jobs(run, db).values()) == {("INDEXED", 1)}


def test_a_server_that_goes_down_mid_run_and_comes_back_loses_nothing(
    tmp_path: Path, server: FileServer
) -> None:
    bodies = {f"/f{i}.bin": generated_bytes(i, 96 * KIB) for i in range(6)}
    urls = [server.add(path, body, rate=192 * KIB) for path, body in bodies.items()]
    manifest = _manifest(tmp_path, urls)
    cfg = Config(
        download_breaker_failures=2,
        download_breaker_cooldown=1.0,
        download_connect_timeout=1.0,
        backoff_base=0.05,
    )
    client = HttpClient(cfg, per_host=2)
    stopped = threading.Event()

    def on_jobs(done: int, _total: int) -> None:
        if done >= 2 and not stopped.is_set():
            stopped.set()
            server.close()  # the machine goes down: transfers in flight break off

    def bring_back() -> None:
        stopped.wait(30)
        deadline = time.monotonic() + 30
        while not any(h.opens for h in client.hosts.reports()):
            assert time.monotonic() < deadline, "the breaker never opened"
            time.sleep(0.02)
        server.restart()

    helper = threading.Thread(target=bring_back)
    helper.start()
    with open_store(tmp_path / "ledger.sqlite", config=cfg) as store:
        summary = download(
            store,
            manifest,
            tmp_path / "out",
            workers=2,
            config=cfg,
            client=client,
            progress=Progress(on_jobs=on_jobs),
        )
        helper.join(30)
        infos = [store.job(j.job_id) for j in store.jobs()]
    client.close()
    assert stopped.is_set()
    assert (summary.succeeded, summary.failed, summary.pending) == (6, 0, 0)
    assert [(i.state, i.attempts) for i in infos] == [("INDEXED", 1)] * 6
    (host,) = summary.hosts
    assert host.state == "closed"
    assert host.opens >= 1
    assert host.deferred >= 1
    rows = [json.loads(x) for x in (tmp_path / "out" / "index.jsonl").read_text().splitlines()]
    stored = {r["url"].split("/", 3)[3]: (tmp_path / "out" / r["path"]).read_bytes() for r in rows}
    assert stored == {path.lstrip("/"): body for path, body in bodies.items()}


def test_a_503_outage_opens_the_breaker_and_spends_no_attempt(
    run: Callable[..., Outcome], tmp_path: Path, server: FileServer
) -> None:
    bodies = {f"/f{i}.bin": generated_bytes(i, 8 * KIB) for i in range(4)}
    urls = [server.add(path, body) for path, body in bodies.items()]
    server.outage(6, status=503)
    path = _manifest(tmp_path, urls)
    db = ["--db", str(tmp_path / "ledger.sqlite")]
    patient = [*FAST, "--set", "download_host_patience=30"]  # the outage is short
    first = run(*db, *patient, "download", str(path), "--out", "out", "--workers", "2", "--json")
    assert first.code == 0, first.out + first.err
    summary = json.loads(first.out)
    assert (summary["succeeded"], summary["failed"]) == (4, 0)
    (host,) = summary["hosts"]
    assert (host["state"], host["last_error"]) == ("closed", "HTTP 503")
    assert host["opens"] >= 1
    # Recorded in the ledger as it opened and closed again (one row per process).
    (row,) = json.loads(run(*db, "status", "--json").out)["breakers"]
    assert (row["host"], row["state"], row["until"]) == (host["host"], "closed", None)
    assert (row["opens"], row["last_error"], row["failures"]) == (host["opens"], "HTTP 503", 0)
    assert set(_jobs(run, db).values()) == {("INDEXED", 1)}
    statuses = [r.status for r in server.requests()]
    assert statuses.count(503) == 6
    assert len(statuses) == 6 + 4  # the outage, then one GET per file
    again = run(*db, "download", str(path), "--out", "out")
    assert again.code == 0
    assert len(server.requests()) == 10  # a finished manifest costs no request


def test_a_429_with_retry_after_pauses_the_whole_host(
    run: Callable[..., Outcome], tmp_path: Path, server: FileServer
) -> None:
    first_url = server.add("/a.bin", generated_bytes(1, 8 * KIB), fail_first=[429], retry_after="1")
    # The other files answer slowly, so a worker cannot finish a request and send the next
    # in the moment between the 429 leaving the server and the client pausing the host.
    others = [
        server.add(f"/b{i}.bin", generated_bytes(2 + i, 8 * KIB), delay=0.4) for i in range(4)
    ]
    path = _manifest(tmp_path, [first_url, *others])
    db = ["--db", str(tmp_path / "ledger.sqlite")]
    out = run(*db, "download", str(path), "--out", "out", "--workers", "3", "--json")
    assert out.code == 0, out.out + out.err
    summary = json.loads(out.out)
    assert summary["succeeded"] == 5
    (host,) = summary["hosts"]
    assert (host["throttled"], host["opens"], host["state"]) == (1, 0, "closed")
    log = server.requests()
    (throttled,) = [r for r in log if r.status == 429]
    # Every request sent after the client read the 429 (to any path of the host) waited
    # the second it asked; only the two other workers' requests already on their way (one
    # each) came sooner.
    later = [r for r in log if r.at > throttled.at]
    early = [r for r in later if r.at < throttled.at + 0.95]
    assert len(early) <= 2, early
    assert len(later) > len(early)
    assert set(_jobs(run, db).values()) == {("INDEXED", 1)}
    human = run(*db, "download", str(path), "--out", "out")
    assert human.code == 0
    assert len(server.requests()) == len(log)


def test_the_per_host_limit_follows_workers_and_says_when_it_held_the_run_back(
    run: Callable[..., Outcome], tmp_path: Path, server: FileServer
) -> None:
    urls = [server.add(f"/f{i}.bin", generated_bytes(i, 4 * KIB)) for i in range(3)]
    path = _manifest(tmp_path, urls)
    db = ["--db", str(tmp_path / "ledger.sqlite")]
    out = run(*db, "download", str(path), "--out", "out", "--workers", "64", "--json")
    assert out.code == 0, out.err
    summary = json.loads(out.out)
    assert (summary["workers"], summary["per_host"]) == (64, 64)
    capped = run(
        *db, "--set", "download_per_host=2", "download", str(path), "--out", "o2", "--workers", "8"
    )
    assert capped.code == 0, capped.err
    assert (
        "note: at most 2 connection(s) per host (download_per_host) held the run below "
        "--workers 8; raise it with --set download_per_host=8"
    ) in capped.out
    assert "download_per_host" in run("download", "--help").out


def test_the_request_rate_per_host_spaces_every_request_to_it(
    run: Callable[..., Outcome], tmp_path: Path, server: FileServer
) -> None:
    # Ten files: ten requests (one GET each), as ten were with a HEAD and a GET for five.
    urls = [server.add(f"/f{i}.bin", generated_bytes(i, 2 * KIB)) for i in range(10)]
    path = _manifest(tmp_path, urls)
    db = ["--db", str(tmp_path / "ledger.sqlite")]
    rate = ["--set", "download_rate_per_host=8"]
    out = run(*db, *rate, "download", str(path), "--out", "out", "--workers", "4")
    assert out.code == 0, out.err
    arrivals = sorted(r.at for r in server.requests())
    assert len(arrivals) == 10  # one GET per file
    # 8 requests per second: ten requests span at least nine intervals of 1/8 s.
    assert arrivals[-1] - arrivals[0] >= 9 / 8 * 0.9


def test_a_host_that_keeps_asking_to_wait_hands_the_job_back_without_an_attempt(
    run: Callable[..., Outcome], tmp_path: Path, server: FileServer
) -> None:
    url = server.add("/a.bin", generated_bytes(1, 4 * KIB))
    server.outage(3, status=503, retry_after="0")
    path = _manifest(tmp_path, [url])
    db = ["--db", str(tmp_path / "ledger.sqlite")]
    tries = ["--set", "download_max_retries=2", "--set", "download_breaker_failures=10"]
    out = run(*db, *tries, "download", str(path), "--out", "out", "--json")
    assert out.code == 0, out.out + out.err
    summary = json.loads(out.out)
    (host,) = summary["hosts"]
    assert (host["throttled"], host["deferred"], host["opens"]) == (3, 1, 0)
    # Three answers of 503 + Retry-After used up one lease's tries: handed back, not failed.
    assert set(_jobs(run, db).values()) == {("INDEXED", 1)}
    assert [r.status for r in server.requests()] == [503, 503, 503, 200]  # one GET in the end
