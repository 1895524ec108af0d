"""``jobledger worker MODULE:ATTR``: loading handlers and running them to idle."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from impl import open_store
from model import Plan
from tests.cli.conftest import THUMB, Outcome

HANDLERS = """
def done(ctx):
    ctx.advance("DONE")

def boom(ctx):
    raise RuntimeError("thumbnailer crashed")

handlers = {"thumb": done}
failing = {"thumb": boom}
not_a_dict = 42
wrong_kind = {"nope": done}

def make():
    return {"thumb": done}
"""


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A handlers module in the working directory, under a name unique to this test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = f"handlers_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(HANDLERS)
    return name


def make_db(path: Path, *, jobs: int, max_attempts: int = 5) -> list[str]:
    with open_store(path) as store:
        store.register(THUMB)
        return store.plan_many(
            "thumb", [Plan({"n": i}, max_attempts=max_attempts) for i in range(jobs)]
        )


def test_worker_runs_jobs_until_idle(
    run: Callable[..., Outcome], tmp_path: Path, module: str
) -> None:
    path = tmp_path / "db.sqlite"
    ids = make_db(path, jobs=3)
    out = run("--db", str(path), "worker", f"{module}:handlers", "--until-idle", "--name", "w-test")
    assert out.code == 0, out.err
    assert "3 finished" in out.out
    with open_store(path) as store:
        assert [store.state(i) for i in ids] == ["DONE"] * 3
        assert store.history(ids[0])[1].worker == "w-test"


def test_worker_with_concurrency_and_a_factory(
    run: Callable[..., Outcome], tmp_path: Path, module: str
) -> None:
    path = tmp_path / "db.sqlite"
    ids = make_db(path, jobs=6)
    out = run("--db", str(path), "worker", f"{module}:make", "--until-idle", "--concurrency", "3")
    assert out.code == 0, out.err
    with open_store(path) as store:
        assert {store.state(i) for i in ids} == {"DONE"}


def test_worker_exits_1_when_jobs_failed(
    run: Callable[..., Outcome], tmp_path: Path, module: str
) -> None:
    path = tmp_path / "db.sqlite"
    ids = make_db(path, jobs=2, max_attempts=1)
    out = run("--db", str(path), "worker", f"{module}:failing", "--until-idle")
    assert out.code == 1
    assert "2 job(s) failed" in out.err
    with open_store(path) as store:
        job = store.job(ids[0])
    assert job.state == "FAILED"
    assert "thumbnailer crashed" in (job.last_error or "")


@pytest.mark.parametrize(
    ("attr", "word"),
    [
        ("not_a_dict", "dict of job kind"),
        ("missing", "no attribute"),
        ("", "MODULE:ATTR"),
    ],
)
def test_worker_bad_handler_spec_exits_2(
    run: Callable[..., Outcome], tmp_path: Path, module: str, attr: str, word: str
) -> None:
    path = tmp_path / "db.sqlite"
    make_db(path, jobs=1)
    out = run("--db", str(path), "worker", f"{module}:{attr}" if attr else module, "--until-idle")
    assert out.code == 2
    assert word in out.err
    assert "Traceback" not in out.err


def test_worker_missing_module_exits_2(run: Callable[..., Outcome], tmp_path: Path) -> None:
    out = run("--db", str(tmp_path / "db.sqlite"), "worker", "no_such_module_x:handlers")
    assert out.code == 2
    assert "cannot import module 'no_such_module_x'" in out.err


def test_worker_unknown_kind_exits_2(
    run: Callable[..., Outcome], tmp_path: Path, module: str
) -> None:
    path = tmp_path / "db.sqlite"
    make_db(path, jobs=1)
    out = run("--db", str(path), "worker", f"{module}:wrong_kind", "--until-idle")
    assert out.code == 2
    assert "nope" in out.err
