"""``jobledger download`` against a local HTTP server."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from impl.download.testserver import FileServer, generated_bytes
from tests.cli.conftest import Outcome


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as srv:
        yield srv


def manifest(tmp_path: Path, urls: list[str]) -> Path:
    path = tmp_path / "urls.txt"
    path.write_text("# artifacts\n" + "\n".join(urls) + "\n\n")
    return path


def test_download_fetches_everything_then_a_rerun_fetches_nothing(
    run: Callable[..., Outcome], tmp_path: Path, server: FileServer
) -> None:
    urls = [server.add(f"/f{i}.bin", generated_bytes(i, 10_000 + i)) for i in range(3)]
    path = manifest(tmp_path, urls)
    db = ["--db", str(tmp_path / "db.sqlite")]
    out = run(*db, "download", str(path), "--out", "out", "--workers", "2", "--json")
    assert out.code == 0, out.err
    summary = json.loads(out.out)
    assert summary["total"] == 3
    assert summary["succeeded"] == 3
    assert summary["failed"] == 0
    assert summary["ok"] is True
    gets = len(server.requests(method="GET"))
    again = run(*db, "download", str(path), "--out", "out")
    assert again.code == 0, again.err
    assert "3 artifact(s): 3 downloaded" in again.out
    assert len(server.requests(method="GET")) == gets
    status = json.loads(run(*db, "status", "--json").out)
    assert status["by_state"]["download"]["INDEXED"] == 3


def test_download_with_a_failing_artifact_exits_1(
    run: Callable[..., Outcome], tmp_path: Path, server: FileServer
) -> None:
    good = server.add("/good.bin", generated_bytes(1, 1000))
    bad = server.add("/gone.bin", b"", status=404)
    path = manifest(tmp_path, [good, bad])
    out = run("--db", str(tmp_path / "db.sqlite"), "download", str(path), "--out", "out")
    assert out.code == 1, out.err
    assert "1 failed" in out.out
    assert "gone.bin" in out.out
    assert "jobledger retry --all-failed" in out.out


def test_download_bad_manifest_line_exits_2_naming_the_line(
    run: Callable[..., Outcome], tmp_path: Path
) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"work_id": "w", "artifact_id": "a", "url": "http://127.0.0.1:9/x"}\n{nope\n')
    out = run("--db", str(tmp_path / "db.sqlite"), "download", str(path), "--out", "out")
    assert out.code == 2
    assert f"{path}:2" in out.err
    assert "Traceback" not in out.err


def test_download_missing_manifest_exits_2(run: Callable[..., Outcome], tmp_path: Path) -> None:
    out = run("--db", str(tmp_path / "db.sqlite"), "download", "nope.txt", "--out", "out")
    assert out.code == 2
    assert "nope.txt" in out.err


@pytest.mark.xdist_group("processes")
def test_demo_kills_resumes_and_verifies(run: Callable[..., Outcome], tmp_path: Path) -> None:
    out = run(
        "demo",
        "--dir",
        "d",
        "--files",
        "2",
        "--size",
        "100000",
        "--kills",
        "1",
        "--rate",
        "50000",
        "--json",
    )
    assert out.code == 0, out.err
    report = json.loads(out.out)
    assert report["ok"] is True
    assert report["verified"] == 2
    assert report["kills"] == 1
    assert "round 1: SIGKILLed" in out.err
    assert (tmp_path / "d" / "ledger.sqlite").exists()
