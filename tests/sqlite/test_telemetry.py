"""History reaches telemetry listeners after commit, exactly as it was recorded.

A listener (an exporter of metrics or traces) must see what the ledger durably
recorded: every entry of a committed transaction, in order, and nothing of one that
rolled back, or a dashboard would count leases and effects that never happened.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from impl import failpoint, telemetry
from impl.sqlite.store import SqliteStore
from model import Event, HistoryEvent, ManualClock, Workflow

FLOW = Workflow(
    name="flow",
    states=["A", "B", "C"],
    transitions=[("A", "B"), ("B", "C")],
    initial="A",
    terminal=["C"],
)


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    failpoint.disarm_all()
    for listener in telemetry.listeners():
        telemetry.remove_listener(listener)
    yield
    failpoint.disarm_all()
    for listener in telemetry.listeners():
        telemetry.remove_listener(listener)


def test_listener_sees_exactly_the_committed_history(tmp_path: Path) -> None:
    clock = ManualClock()
    seen: list[object] = []
    with SqliteStore(tmp_path / "db.sqlite", clock=clock) as store:
        store.register(FLOW)
        telemetry.add_listener(seen.append)
        job_id = store.plan("flow", {"n": 1})
        lease = store.lease_next("w", ttl=30)
        assert lease is not None
        assert store.advance(lease, "B")
        assert store.run_effect(lease, "op", lambda ctx: {"ok": True}) == {"ok": True}
        # A replay of a recorded effect and of a passed state write nothing: no event.
        assert store.run_effect(lease, "op", lambda ctx: 1 / 0) == {"ok": True}
        assert not store.advance(lease, "A")
        # Crashes just before commit: nothing of these transactions may be reported.
        for point, call in (
            ("advance.before_commit", lambda: store.advance(lease, "C")),
            ("effect_start.before_commit", lambda: store.run_effect(lease, "x", lambda c: 1)),
            ("renew.before_commit", lambda: store.renew(lease)),
        ):
            failpoint.arm(point)
            with pytest.raises(failpoint.Crash):
                call()
        assert store.advance(lease, "C")
        recorded = store.history(job_id)
    assert all(isinstance(event, HistoryEvent) for event in seen)
    assert seen == recorded
    assert [e.event for e in recorded] == [
        Event.PLANNED,
        Event.LEASED,
        Event.ADVANCED,
        Event.EFFECT_STARTED,
        Event.EFFECT_RECORDED,
        Event.ADVANCED,
    ]


def test_a_crash_after_commit_still_reports_what_was_committed(tmp_path: Path) -> None:
    """The commit is what counts: the entries were durable before the process died."""
    seen: list[object] = []
    with SqliteStore(tmp_path / "db.sqlite", clock=ManualClock()) as store:
        job_id = store.plan("download", {"url": "u"})
        telemetry.add_listener(seen.append)
        failpoint.arm("lease_next.after_commit")
        with pytest.raises(failpoint.Crash):
            store.lease_next("w")
        assert seen == store.history(job_id)[1:]
        assert [e.event for e in seen] == [Event.LEASED]  # type: ignore[attr-defined]


def test_plan_many_and_reconcile_report_their_entries(tmp_path: Path) -> None:
    clock = ManualClock()
    seen: list[HistoryEvent] = []
    with SqliteStore(tmp_path / "db.sqlite", clock=clock) as store:
        telemetry.add_listener(seen.append)  # type: ignore[arg-type]
        ids = store.plan_many("download", [{"url": "a"}, {"url": "b"}, {"url": "a"}])
        lease = store.lease_next("w", ttl=5)
        assert lease is not None
        clock.advance(10)
        assert store.reconcile().leases_expired == 1
        everything = [e for job_id in dict.fromkeys(ids) for e in store.history(job_id)]
    assert sorted(seen, key=lambda e: (e.job_id, e.at)) == sorted(
        everything, key=lambda e: (e.job_id, e.at)
    )
    assert [e.event for e in seen] == [Event.PLANNED, Event.PLANNED, Event.LEASED, Event.EXPIRED]


def test_debug_logging_alone_reports_history(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.DEBUG, logger="jobledger.lease"),
        SqliteStore(tmp_path / "db.sqlite") as store,
    ):
        store.plan("download", {"url": "u"})
        assert store.lease_next("w") is not None
    assert [r.event for r in caplog.records if r.name == "jobledger.lease"] == ["lease.leased"]
