"""Operator actions through the command: reconcile, retry, cancel (SQLite)."""

from __future__ import annotations

import json
from collections.abc import Callable

from impl import open_store
from model import Event
from tests.cli.conftest import Ledger, Outcome


def state_of(ledger: Ledger, job_id: str) -> str:
    with open_store(ledger.path) as store:
        return store.state(job_id)


def events_of(ledger: Ledger, job_id: str) -> list[Event]:
    with open_store(ledger.path) as store:
        return [e.event for e in store.history(job_id)]


def test_reconcile_dry_run_changes_nothing_then_a_pass_does_the_work(
    run: Callable[..., Outcome], ledger: Ledger
) -> None:
    db = ["--db", str(ledger.path)]
    dry = run(*db, "reconcile", "--dry-run", "--json")
    assert dry.code == 0, dry.err
    assert json.loads(dry.out) == {
        "leases_expired": 1,
        "effects_in_doubt": 1,
        "jobs_failed": 0,
        "dry_run": True,
    }
    assert Event.EXPIRED not in events_of(ledger, ledger.expired)
    real = run(*db, "reconcile")
    assert real.code == 0, real.err
    assert "did: expire 1 lease(s), mark 1 effect(s) in doubt, fail 0 job(s)" in real.out
    assert events_of(ledger, ledger.expired)[-2:] == [Event.EXPIRED, Event.EFFECT_IN_DOUBT]
    again = run(*db, "reconcile", "--json")
    assert json.loads(again.out)["leases_expired"] == 0
    status = json.loads(run(*db, "status", "--json").out)
    assert status["leases_expired"] == 0
    assert status["in_doubt"] == 1


def test_cancel_fences_the_holder_and_keeps_the_reason(
    run: Callable[..., Outcome], ledger: Ledger
) -> None:
    out = run("--db", str(ledger.path), "cancel", ledger.live[:12], "--reason", "stuck on host")
    assert out.code == 0, out.err
    assert "now FAILED" in out.out
    with open_store(ledger.path) as store:
        job = store.job(ledger.live)
    assert job.state == "FAILED"
    assert job.last_error == "stuck on host"
    assert job.token == 2
    assert job.lease is None


def test_cancel_needs_a_reason(run: Callable[..., Outcome], ledger: Ledger) -> None:
    out = run("--db", str(ledger.path), "cancel", ledger.live)
    assert out.code == 2
    assert "--reason" in out.err
    blank = run("--db", str(ledger.path), "cancel", ledger.live, "--reason", " ")
    assert blank.code == 2
    assert state_of(ledger, ledger.live) == "HEAD_DONE"


def test_cancel_of_a_finished_job_is_bad_input(run: Callable[..., Outcome], ledger: Ledger) -> None:
    with open_store(ledger.path) as store:
        lease = store.lease_next("w", kinds=["download"])
        assert lease is not None
        # Take the waiting job to a terminal state other than FAILED.
        while lease.job_id != ledger.waiting:
            store.release(lease, delay=1000)
            lease = store.lease_next("w", kinds=["download"])
            assert lease is not None
        store.advance(lease, "SKIPPED_DUPLICATE")
    out = run("--db", str(ledger.path), "cancel", ledger.waiting, "--reason", "x")
    assert out.code == 2
    assert out.err.startswith("error: ")
    assert "Traceback" not in out.err


def test_retry_requeues_a_failed_job(run: Callable[..., Outcome], ledger: Ledger) -> None:
    out = run("--db", str(ledger.path), "retry", ledger.cancelled)
    assert out.code == 0, out.err
    assert "retried 1 job(s)" in out.out
    assert state_of(ledger, ledger.cancelled) == "PLANNED"
    assert events_of(ledger, ledger.cancelled)[-1] == Event.RETRIED


def test_retry_of_a_job_that_did_not_fail_exits_2_but_retries_the_others(
    run: Callable[..., Outcome], ledger: Ledger
) -> None:
    out = run("--db", str(ledger.path), "retry", ledger.waiting, ledger.cancelled)
    assert out.code == 2
    assert len(out.err.strip().splitlines()) == 1
    assert state_of(ledger, ledger.cancelled) == "PLANNED"


def test_retry_all_failed(run: Callable[..., Outcome], ledger: Ledger) -> None:
    run("--db", str(ledger.path), "cancel", ledger.waiting, "--reason", "r")
    out = run("--db", str(ledger.path), "retry", "--all-failed")
    assert out.code == 0, out.err
    assert "retried 2 job(s)" in out.out
    assert state_of(ledger, ledger.waiting) == "PLANNED"
    assert state_of(ledger, ledger.cancelled) == "PLANNED"
    none_left = run("--db", str(ledger.path), "retry", "--all-failed")
    assert "retried 0 job(s)" in none_left.out


def test_retry_needs_ids_or_all_failed_but_not_both(
    run: Callable[..., Outcome], ledger: Ledger
) -> None:
    assert run("--db", str(ledger.path), "retry").code == 2
    both = run("--db", str(ledger.path), "retry", ledger.cancelled, "--all-failed")
    assert both.code == 2
    assert state_of(ledger, ledger.cancelled) == "FAILED"
