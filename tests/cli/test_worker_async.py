"""``jobledger worker`` over ``async def`` handlers: the real command (``python -m impl``)
runs them in an AsyncWorker on SQLite and on PostgreSQL; handlers of both kinds in one
MODULE:ATTR are refused; Ctrl-C stops it with 130 and gives its leases back."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from impl import open_store
from model import Config, Store
from tests.cli.conftest import THUMB, Outcome, process_env

pytestmark = pytest.mark.xdist_group("processes")

ASYNC_MODULE = """
import asyncio
import threading
from pathlib import Path

LOOP_THREADS = set()


async def record(ctx):
    await asyncio.sleep(0.01)  # stands in for an awaited request
    return {"op_key": ctx.op_key}


async def done(ctx):
    LOOP_THREADS.add(threading.get_ident())
    await ctx.effect("fetch", record)
    await ctx.advance("DONE")
    # Every handler ran on one thread, the loop's, however many ran at once.
    Path("threads").write_text(str(len(LOOP_THREADS)))


async def boom(ctx):
    raise RuntimeError("thumbnailer crashed")


async def tick(ctx):
    await asyncio.sleep(0.05)


async def forever(ctx):
    # A long job of many short effects: a stop lands after the current one.
    Path("ready").touch()
    for n in range(100_000):
        await ctx.effect(f"tick {n}", tick)


def sync_done(ctx):
    ctx.advance("DONE")


handlers = {"thumb": done}
failing = {"thumb": boom}
hanging = {"thumb": forever}
mixed = {"thumb": done, "other": sync_done}
"""


@pytest.fixture(params=["sqlite", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[list[str], Config]]:
    """The command's database options and the config to open the same ledger with."""
    if request.param == "sqlite":
        yield ["--db", str(tmp_path / "db.sqlite")], Config()
        return
    import psycopg
    from psycopg import sql

    from tests.pg import PG_URL, require_postgres

    require_postgres()
    schema = f"t_cliaio_{uuid.uuid4().hex[:12]}"
    yield ["--db", PG_URL, "--set", f"postgres_schema={schema}"], Config(postgres_schema=schema)
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _open(db: list[str], config: Config) -> Store:
    return open_store(db[1], config=config)


def _run(cwd: Path, *args: str) -> Outcome:
    proc = subprocess.run(
        [sys.executable, "-m", "impl", *args],
        cwd=cwd,
        env=process_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def test_async_handlers_run_in_the_real_command(
    target: tuple[list[str], Config], tmp_path: Path
) -> None:
    db, config = target
    (tmp_path / "thumbs.py").write_text(ASYNC_MODULE)
    with _open(db, config) as store:
        store.register(THUMB)
        ids = store.plan_many("thumb", [{"n": i} for i in range(12)])
    out = _run(tmp_path, *db, "worker", "thumbs:handlers", "--until-idle", "--concurrency", "4")
    assert out.code == 0, out.err
    assert "12 finished" in out.out
    assert (tmp_path / "threads").read_text() == "1"
    with _open(db, config) as store:
        assert {store.state(i) for i in ids} == {"DONE"}
        for job_id in ids:
            [effect] = store.effects(job_id)
            assert effect.result == {"op_key": effect.op_key}


def test_a_failing_async_handler_exits_1(target: tuple[list[str], Config], tmp_path: Path) -> None:
    db, config = target
    (tmp_path / "thumbs.py").write_text(ASYNC_MODULE)
    with _open(db, config) as store:
        store.register(THUMB)
        store.plan("thumb", {"n": 1}, max_attempts=1)
    out = _run(tmp_path, *db, "worker", "thumbs:failing", "--until-idle")
    assert out.code == 1, out.err
    assert "1 job(s) failed" in out.err


def test_async_and_sync_handlers_together_are_refused(
    run: Callable[..., Outcome], tmp_path: Path
) -> None:
    (tmp_path / "thumbs.py").write_text(ASYNC_MODULE)
    out = run("--db", str(tmp_path / "db.sqlite"), "worker", "thumbs:mixed", "--until-idle")
    assert out.code == 2
    assert "['thumb'] are async def" in out.err
    assert "['other'] are not" in out.err


def test_ctrl_c_stops_an_async_worker_with_130_and_releases_its_lease(tmp_path: Path) -> None:
    (tmp_path / "thumbs.py").write_text(ASYNC_MODULE)
    path = tmp_path / "db.sqlite"
    with open_store(path) as store:
        store.register(THUMB)
        job_id = store.plan("thumb", {"n": 1})
    proc = subprocess.Popen(
        [sys.executable, "-m", "impl", "--db", str(path), "worker", "thumbs:hanging"],
        cwd=tmp_path,
        env=process_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the worker never started the job"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    with open_store(path) as store:
        job = store.job(job_id)
        assert job.lease is None
        assert job.attempts == 0  # released, not failed
