"""Every command through a real ``python -m impl`` process: output, stderr and exit codes
as a shell sees them, and Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from impl import open_store
from impl.download.testserver import FileServer, generated_bytes
from tests.cli.conftest import (
    THUMB,
    Ledger,
    Outcome,
    lock_exclusively,
    make_corrupt,
    make_newer,
    process_env,
)

pytestmark = pytest.mark.xdist_group("processes")


def test_read_commands(run_process: Callable[..., Outcome], ledger: Ledger) -> None:
    db = ["--db", str(ledger.path)]
    human = run_process(*db, "status")
    assert human.code == 0
    assert "HEAD_DONE" in human.out
    leases = run_process(*db, "leases", "--json")
    assert {row["job_id"] for row in json.loads(leases.out)} == {ledger.live, ledger.expired}
    jobs = run_process(*db, "jobs", "--json", "--state", "FAILED")
    assert [j["job_id"] for j in json.loads(jobs.out)] == [ledger.cancelled]
    show = run_process(*db, "show", ledger.live, "--json")
    assert json.loads(show.out)["effects"][0]["op"] == "HEAD"
    config = run_process(*db, "config", "show", "--json")
    assert json.loads(config.out)["db"] == {"value": str(ledger.path), "source": "--db"}


def test_operator_commands(run_process: Callable[..., Outcome], ledger: Ledger) -> None:
    db = ["--db", str(ledger.path)]
    real = run_process(*db, "reconcile", "--json")
    assert json.loads(real.out)["effects_in_doubt"] == 1
    cancel = run_process(*db, "cancel", ledger.live, "--reason", "operator test")
    assert cancel.code == 0, cancel.err
    retry = run_process(*db, "retry", "--all-failed")
    assert retry.code == 0, retry.err
    assert "retried 2 job(s)" in retry.out
    with open_store(ledger.path) as store:
        assert store.state(ledger.live) == "HEAD_DONE"
        assert store.state(ledger.cancelled) == "PLANNED"
    not_failed = run_process(*db, "retry", ledger.live)
    assert not_failed.code == 2
    assert not_failed.err.startswith("error: ")


def test_migrate(run_process: Callable[..., Outcome], tmp_path: Path) -> None:
    db = ["--db", str(tmp_path / "new.sqlite")]
    assert run_process(*db, "migrate", "--check").code == 1
    applied = run_process(*db, "migrate")
    assert applied.code == 0, applied.err
    assert "applied migration 1" in applied.out
    assert run_process(*db, "migrate", "--check").code == 0


WORKER_MODULE = """
def done(ctx):
    ctx.advance("DONE")

handlers = {"thumb": done}

def announcing():
    # Called by the command itself, so a signal after this lands inside it.
    from pathlib import Path
    Path("ready").touch()
    return handlers
"""


def test_worker_until_idle(run_process: Callable[..., Outcome], tmp_path: Path) -> None:
    (tmp_path / "thumbs.py").write_text(WORKER_MODULE)
    path = tmp_path / "db.sqlite"
    with open_store(path) as store:
        store.register(THUMB)
        ids = store.plan_many("thumb", [{"n": i} for i in range(4)])
    out = run_process("--db", str(path), "worker", "thumbs:handlers", "--until-idle")
    assert out.code == 0, out.err
    with open_store(path) as store:
        assert {store.state(i) for i in ids} == {"DONE"}


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as srv:
        yield srv


def test_download(run_process: Callable[..., Outcome], tmp_path: Path, server: FileServer) -> None:
    urls = [server.add(f"/p{i}.bin", generated_bytes(i, 5000)) for i in range(2)]
    (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
    out = run_process("download", "urls.txt", "--out", "out", "--workers", "2")
    assert out.code == 0, out.err
    assert "2 artifact(s): 2 downloaded" in out.out
    assert (tmp_path / "jobledger.sqlite").exists()


def test_database_problems_exit_3(
    run_process: Callable[..., Outcome], ledger: Ledger, tmp_path: Path
) -> None:
    missing = run_process("--db", str(tmp_path / "none.sqlite"), "jobs")
    assert missing.code == 3
    assert missing.err.startswith("error: no database at")
    holder = lock_exclusively(ledger.path)
    try:
        locked = run_process(
            "--db", str(ledger.path), "status", env={"JOBLEDGER_BUSY_TIMEOUT": "0.1"}
        )
    finally:
        holder.close()
    assert locked.code == 3, locked.err
    assert "locked" in locked.err
    make_newer(ledger.path)
    newer = run_process("--db", str(ledger.path), "leases")
    assert newer.code == 3
    assert "version 999" in newer.err
    corrupt_path = tmp_path / "corrupt.sqlite"
    make_corrupt(corrupt_path)
    corrupt = run_process("--db", str(corrupt_path), "show", "0" * 64)
    assert corrupt.code == 3
    for out in (missing, locked, newer, corrupt):
        assert "Traceback" not in out.err
        assert len(out.err.strip().splitlines()) == 1


def test_bad_configuration_exits_2(run_process: Callable[..., Outcome], ledger: Ledger) -> None:
    (ledger.path.parent / "jobledger.yaml").write_text("max_attempt: 3\n")
    key = run_process("--db", str(ledger.path), "status")
    assert key.code == 2
    assert "'max_attempt'" in key.err
    assert "jobledger.yaml:1" in key.err
    (ledger.path.parent / "jobledger.yaml").unlink()
    env = run_process("--db", str(ledger.path), "status", env={"JOBLEDGER_TTL": "1"})
    assert env.code == 2
    assert "JOBLEDGER_TTL" in env.err
    for out in (key, env):
        assert "Traceback" not in out.err


def _interrupt(args: list[str], cwd: Path, ready: Callable[[], bool]) -> tuple[int, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "impl", *args],
        cwd=cwd,
        env=process_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the command never got going"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def test_ctrl_c_stops_a_worker_with_130(tmp_path: Path) -> None:
    (tmp_path / "thumbs.py").write_text(WORKER_MODULE)
    path = tmp_path / "db.sqlite"
    with open_store(path) as store:
        store.register(THUMB)

    def waiting() -> bool:
        return (tmp_path / "ready").exists()

    code, err = _interrupt(["--db", str(path), "worker", "thumbs:announcing"], tmp_path, waiting)
    assert code == 130, err
    assert "Traceback" not in err


def test_ctrl_c_stops_a_download_with_130_and_releases_its_leases(
    tmp_path: Path, server: FileServer
) -> None:
    url = server.add("/slow.bin", generated_bytes(7, 400_000), rate=50_000)
    (tmp_path / "urls.txt").write_text(url + "\n")
    path = tmp_path / "db.sqlite"

    def streaming() -> bool:
        return any(r.method == "GET" for r in server.requests("/slow.bin"))

    code, err = _interrupt(
        ["--db", str(path), "download", "urls.txt", "--out", "out"], tmp_path, streaming
    )
    assert code == 130, err
    assert "Traceback" not in err
    with open_store(path) as store:
        assert store.leases() == []
