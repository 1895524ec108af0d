"""``jobledger prune`` and the worker's configured retention, as a shell runs them.

The store's prune rules are checked by the conformance suite; these tests check what the
command adds: the AGE syntax, the report (human and ``--json``), the archive file (one
``show --json`` object per line, fsynced before the delete), errors with exit 2 and no
traceback, and that ``jobs`` and ``show`` no longer list pruned jobs.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

import impl
from model import JobPruned, ManualClock, Workflow
from tests.cli.conftest import Outcome
from tests.cli.test_worker import make_db, module  # noqa: F401 - the module fixture

FLOW = Workflow(name="f", states=["A", "B"], transitions=[("A", "B")], initial="A", terminal=["B"])


def _finished(store: impl.Store, n: int, *, start: int = 0) -> list[str]:
    store.register(FLOW)
    ids = store.plan_many("f", [{"n": i} for i in range(start, start + n)])
    while (lease := store.lease_next("w")) is not None:
        store.run_effect(lease, "e", lambda ctx: {"ok": True})
        store.advance(lease, "B")
    return ids


@pytest.fixture
def db(tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    """Three jobs that finished two days ago, two that finished now, one waiting."""
    path = tmp_path / "jobs.sqlite"
    clock = ManualClock(1_700_000_000.0)
    with impl.open_store(path, clock=clock) as store:
        old = _finished(store, 3)
    with impl.open_store(path) as store:
        new = _finished(store, 2, start=10)
        store.plan("f", {"n": 99})
    return path, old, new


def test_prune_by_age_with_a_json_report(
    run: Callable[..., Outcome], db: tuple[Path, list[str], list[str]]
) -> None:
    path, old, new = db
    out = run("--db", str(path), "prune", "--finished-before", "1d", "--json")
    assert out.code == 0, out.err
    report = json.loads(out.out)
    assert report["jobs"] == 3
    assert (report["effects"], report["tombstones"], report["batches"]) == (3, 3, 1)
    assert report["dry_run"] is False
    listed = run("--db", str(path), "jobs", "--json")
    assert {j["job_id"] for j in json.loads(listed.out)} == {*new, impl.job_key("f", {"n": 99})}
    shown = run("--db", str(path), "show", old[0])
    assert shown.code == 2
    assert "pruned" in shown.err
    assert "Traceback" not in shown.err


def test_dry_run_counts_and_keeps_everything(
    run: Callable[..., Outcome], db: tuple[Path, list[str], list[str]]
) -> None:
    path, old, _ = db
    out = run("--db", str(path), "prune", "--finished-before", "0s", "--dry-run")
    assert out.code == 0, out.err
    assert out.out.startswith("would prune 5 job(s)")
    with impl.open_store(path) as store:
        assert store.state(old[0]) == "B"


def test_the_archive_holds_what_show_json_printed(
    run: Callable[..., Outcome], db: tuple[Path, list[str], list[str]], tmp_path: Path
) -> None:
    path, old, _ = db
    shown = [json.loads(run("--db", str(path), "show", j, "--json").out) for j in old]
    archive = tmp_path / "pruned.jsonl"
    archive.write_text("")  # appended to, not replaced
    out = run("--db", str(path), "prune", "--finished-before", "1d", "--archive", str(archive))
    assert out.code == 0, out.err
    assert f"archived to {archive}" in out.out
    lines = [json.loads(line) for line in archive.read_text().splitlines()]
    assert lines == shown


def test_an_unwritable_archive_prunes_nothing(
    run: Callable[..., Outcome], db: tuple[Path, list[str], list[str]], tmp_path: Path
) -> None:
    path, old, _ = db
    out = run(
        "--db", str(path), "prune", "--finished-before", "0s", "--archive", str(tmp_path / "no/a")
    )
    assert out.code == 2
    assert "cannot open the archive" in out.err
    assert "Traceback" not in out.err
    with impl.open_store(path) as store:
        assert store.state(old[0]) == "B"


def test_a_full_disk_under_the_archive_keeps_the_batch(
    run: Callable[..., Outcome], db: tuple[Path, list[str], list[str]], tmp_path: Path
) -> None:
    """A real tmpfs of 64 KiB filled up: the archive's write fails, the batch it was for
    is rolled back, and the command says so (exit 2)."""
    import os
    import subprocess

    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs in CI: {done.stderr.decode()}")
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        (mount / "filler").write_bytes(b"x" * (64 * 1024 - 100))
        path, old, _ = db
        out = run(
            "--db", str(path), "prune", "--finished-before", "0s", "--archive", str(mount / "a")
        )
        assert out.code == 2, out.out
        assert "cannot write the archive" in out.err
        assert "was not deleted" in out.err
        with impl.open_store(path) as store:
            assert [store.state(j) for j in old] == ["B"] * 3
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("age", ["30", "3x", "-1d", "d"])
def test_a_bad_age_is_exit_2_with_what_is_accepted(
    run: Callable[..., Outcome], db: tuple[Path, list[str], list[str]], age: str
) -> None:
    path, _, _ = db
    out = run("--db", str(path), "prune", "--finished-before", age)
    if age == "30":  # a bare number is seconds
        assert out.code == 0, out.err
        return
    assert out.code == 2
    assert "30d" in out.err


def test_forget_keys_lets_an_identity_be_planned_anew(
    run: Callable[..., Outcome], db: tuple[Path, list[str], list[str]]
) -> None:
    path, old, _ = db
    out = run("--db", str(path), "prune", "--finished-before", "1d", "--forget-keys")
    assert out.code == 0, out.err
    assert "no keys kept" in out.out
    with impl.open_store(path) as store:
        assert store.plan("f", {"n": 0}) == old[0]
        assert store.state(old[0]) == "A"


def test_keep_failed(run: Callable[..., Outcome], tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    with impl.open_store(path) as store:
        store.register(FLOW)
        failed = store.plan("f", {"n": 1})
        store.cancel(failed, "no")
    out = run("--db", str(path), "prune", "--finished-before", "0s", "--keep-failed", "--json")
    assert json.loads(out.out)["jobs"] == 0
    with impl.open_store(path) as store:
        assert store.state(failed) == "FAILED"


def test_a_worker_with_retention_prunes_finished_jobs(
    run: Callable[..., Outcome],
    tmp_path: Path,
    module: str,  # noqa: F811 - the fixture
) -> None:
    path = tmp_path / "db.sqlite"
    with impl.open_store(path) as store:
        old = _finished(store, 3)
    fresh = make_db(path, jobs=2)
    out = run(
        "--db", str(path), "--set", "retention=0s", "worker", f"{module}:handlers", "--until-idle"
    )
    assert out.code == 0, out.err
    with impl.open_store(path) as store:
        for job_id in old:
            with pytest.raises(JobPruned):
                store.job(job_id)
        # The jobs this run finished may or may not have met a pass; they were run.
        for job_id in fresh:
            with contextlib.suppress(JobPruned):
                assert store.state(job_id) == "DONE"


def test_a_worker_without_retention_prunes_nothing(
    run: Callable[..., Outcome],
    tmp_path: Path,
    module: str,  # noqa: F811 - the fixture
) -> None:
    path = tmp_path / "db.sqlite"
    with impl.open_store(path) as store:
        old = _finished(store, 2)
    make_db(path, jobs=1)
    out = run("--db", str(path), "worker", f"{module}:handlers", "--until-idle")
    assert out.code == 0, out.err
    with impl.open_store(path) as store:
        assert [store.state(j) for j in old] == ["B", "B"]


def test_progress_goes_to_stderr_on_long_runs(
    run: Callable[..., Outcome],
    db: tuple[Path, list[str], list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from impl.cli import retention

    monkeypatch.setattr(retention, "PROGRESS_EVERY", -1.0)  # every batch is "long"
    path, _, _ = db
    out = run("--db", str(path), "prune", "--finished-before", "0s", "--json")
    assert out.code == 0, out.err
    assert "pruned 5 job(s) so far in 1 batch(es)" in out.err
    assert json.loads(out.out)["jobs"] == 5
