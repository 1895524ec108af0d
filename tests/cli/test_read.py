"""The read commands (status, leases, jobs, show) on the reference model and on SQLite."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest

from model import JobInfo, ManualClock, MemoryStore, Stats, Store
from tests.cli.conftest import Ledger, Outcome, populate


class _KeepOpen:
    """A store whose close does nothing, so one model serves several commands."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    def close(self) -> None:
        pass


@attrs.define
class Target:
    """How to point the command at a populated ledger."""

    args: list[str]
    obj: object
    ledger: Ledger


@pytest.fixture(params=["memory", "sqlite"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if request.param == "memory":
        clock = ManualClock(time.time() - 100)
        store = MemoryStore(clock=clock)
        ledger = populate(store, clock, tmp_path / "unused")
        keep = _KeepOpen(store)
        return Target(["--db", "memory:"], lambda _target, _config: keep, ledger)
    ledger = request.getfixturevalue("ledger")
    return Target(["--db", str(ledger.path)], None, ledger)


@pytest.fixture
def cmd(run: Callable[..., Outcome], target: Target) -> Callable[..., Outcome]:
    def invoke(*args: str) -> Outcome:
        return run(*target.args, *args, obj=target.obj)

    return invoke


def test_status_json_is_the_stats_fields(cmd: Callable[..., Outcome], target: Target) -> None:
    out = cmd("status", "--json")
    assert out.code == 0, out.err
    data = json.loads(out.out)
    assert list(data) == [*(f.name for f in attrs.fields(Stats)), "breakers"]
    assert data["breakers"] == []
    assert data["by_state"]["download"]["PLANNED"] == 2
    assert data["by_state"]["download"]["HEAD_DONE"] == 1
    assert data["by_state"]["download"]["FAILED"] == 1
    assert data["by_state"]["thumb"] == {"PLANNED": 0, "DONE": 0, "FAILED": 0}
    assert data["leases_live"] == 1
    assert data["leases_expired"] == 1
    assert data["failed"] == 1
    assert data["in_doubt"] == (1 if target.ledger.has_doubt else 0)
    assert 45 <= data["oldest_eligible_age"] <= 200


def test_status_human(cmd: Callable[..., Outcome]) -> None:
    out = cmd("status")
    assert out.code == 0, out.err
    assert "download" in out.out
    assert "HEAD_DONE" in out.out
    assert "1 live, 1 expired" in out.out
    assert "failed: 1" in out.out
    assert "queue lag:" in out.out
    assert "jobledger reconcile" in out.out


def test_leases_json_and_human(cmd: Callable[..., Outcome], target: Target) -> None:
    out = cmd("leases", "--json")
    assert out.code == 0, out.err
    rows = {row["job_id"]: row for row in json.loads(out.out)}
    assert set(rows) == {target.ledger.live, target.ledger.expired}
    live = rows[target.ledger.live]
    assert live["worker"] == "worker-1"
    assert live["live"] is True
    assert live["token"] == 1
    assert 3000 < live["seconds_left"] <= 3600
    assert rows[target.ledger.expired]["live"] is False
    human = cmd("leases")
    assert human.code == 0
    assert target.ledger.live[:12] in human.out
    assert "worker-1" in human.out
    assert "left" in human.out
    assert "expired" in human.out


def test_jobs_json_lists_jobinfo_fields_with_job_id_first(
    cmd: Callable[..., Outcome], target: Target
) -> None:
    out = cmd("jobs", "--json")
    assert out.code == 0, out.err
    jobs = json.loads(out.out)
    assert [j["job_id"] for j in jobs] == [
        target.ledger.waiting,
        target.ledger.cancelled,
        target.ledger.live,
        target.ledger.expired,
    ]
    for job in jobs:
        assert next(iter(job)) == "job_id"
        assert set(job) == {f.name for f in attrs.fields(JobInfo)}
    live = next(j for j in jobs if j["job_id"] == target.ledger.live)
    assert live["lease"]["worker"] == "worker-1"
    assert live["identity"]["work_id"] == "w3"


def test_jobs_filters_limit_and_order(cmd: Callable[..., Outcome], target: Target) -> None:
    def ids(*args: str) -> list[str]:
        out = cmd("jobs", "--json", *args)
        assert out.code == 0, out.err
        return [j["job_id"] for j in json.loads(out.out)]

    assert ids("--state", "FAILED") == [target.ledger.cancelled]
    assert ids("--kind", "thumb") == []
    assert ids("--limit", "2") == [target.ledger.waiting, target.ledger.cancelled]
    assert ids("--newest", "--limit", "1") == [target.ledger.expired]


def test_jobs_human_shows_short_ids_and_errors(cmd: Callable[..., Outcome], target: Target) -> None:
    out = cmd("jobs")
    assert out.code == 0, out.err
    assert target.ledger.cancelled[:12] in out.out
    assert target.ledger.cancelled not in out.out
    assert "bad url" in out.out
    assert "worker-1" in out.out
    assert cmd("jobs", "--state", "DEDUPED").out.strip() == "no jobs"


def test_jobs_rejects_a_bad_limit(cmd: Callable[..., Outcome]) -> None:
    out = cmd("jobs", "--limit", "0")
    assert out.code == 2
    assert "--limit" in out.err


def test_show_json_has_effects_and_history(cmd: Callable[..., Outcome], target: Target) -> None:
    out = cmd("show", target.ledger.live, "--json")
    assert out.code == 0, out.err
    job = json.loads(out.out)
    assert next(iter(job)) == "job_id"
    assert job["job_id"] == target.ledger.live
    assert job["state"] == "HEAD_DONE"
    (effect,) = job["effects"]
    assert effect["op"] == "HEAD"
    assert effect["status"] == "done"
    assert effect["result"] == {"status": 200, "length": 5}
    assert effect["token"] == 1
    for key in ("op_key", "started_at", "finished_at"):
        assert key in effect
    events = [e["event"] for e in job["history"]]
    assert events == ["planned", "leased", "effect_started", "effect_recorded", "advanced"]
    assert job["history"][-1]["detail"] == {"from": "PLANNED", "to": "HEAD_DONE"}


def test_show_accepts_a_unique_prefix(cmd: Callable[..., Outcome], target: Target) -> None:
    out = cmd("show", target.ledger.cancelled[:10], "--json")
    assert out.code == 0, out.err
    job = json.loads(out.out)
    assert job["job_id"] == target.ledger.cancelled
    assert job["last_error"] == "bad url"
    assert job["payload"] == {"why": "test"}
    assert [e["event"] for e in job["history"]] == ["planned", "cancelled"]


def test_show_human(cmd: Callable[..., Outcome], target: Target) -> None:
    out = cmd("show", target.ledger.live)
    assert out.code == 0, out.err
    for text in (target.ledger.live, "HEAD_DONE", "worker-1", "effects", "HEAD", "history"):
        assert text in out.out
    assert "effect_recorded" in out.out
    doubt = cmd("show", target.ledger.expired)
    assert doubt.code == 0
    if target.ledger.has_doubt:
        assert "STREAM" in doubt.out
        assert "started" in doubt.out


@pytest.mark.parametrize("job_id", ["0" * 64, "zz-not-hex", "0" * 65])
def test_show_unknown_or_malformed_id_exits_2(cmd: Callable[..., Outcome], job_id: str) -> None:
    out = cmd("show", job_id)
    assert out.code == 2
    assert out.err.startswith("error: ")
    assert len(out.err.strip().splitlines()) == 1
    assert "Traceback" not in out.err


def test_show_ambiguous_prefix_exits_2(cmd: Callable[..., Outcome], target: Target) -> None:
    ids = [target.ledger.live, target.ledger.expired, target.ledger.waiting]
    common = ""
    for a in ids:
        for b in ids:
            if a != b:
                n = next(i for i in range(64) if a[i] != b[i])
                if n > len(common):
                    common = a[:n]
    if not common:
        out = cmd("show", "")
        assert out.code == 2
        return
    out = cmd("show", common)
    assert out.code == 2
    assert "matches" in out.err
