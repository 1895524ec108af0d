"""Retention: ``prune`` removes finished jobs in batches and keeps their keys planned.

Every rule of ``model.retention`` is checked on every backend: which jobs go (terminal,
finished before the cutoff, failed ones kept on request), what stays of them (a
tombstone: plan is a no-op, reads raise ``JobPruned``), forgetting keys, dry runs,
batches and progress, the limit, and the archive that sees each batch before its delete
commits (and stops the prune, deleting nothing of that batch, when it raises).
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from model import (
    IdempotencyConflict,
    InvalidInput,
    JobPruned,
    LeaseLost,
    ManualClock,
    PrunedJob,
    PruneReport,
    Store,
    UnknownJob,
)

from .flows import LINEAR, plan_and_lease, setup, snapshot


def finish(store: Store, n: int, *, failed: bool = False) -> str:
    """Plan job ``{"n": n}``, run one effect and take it to DONE (or FAILED)."""
    lease = plan_and_lease(store, {"n": n})
    store.run_effect(lease, "work", lambda ctx: {"n": n})
    if failed:
        store.fail(lease, "broken", retryable=False)
    else:
        for state in ("A", "B", "DONE"):
            store.advance(lease, state)
    return lease.job_id


def ids_of(store: Store) -> list[str]:
    return [j.job_id for j in store.jobs()]


def test_prune_removes_finished_jobs_before_the_cutoff_and_keeps_the_rest(
    store: Store, clock: ManualClock
) -> None:
    setup(store)
    old = [finish(store, n) for n in range(3)]
    clock.advance(10)
    boundary = finish(store, 10)  # finished exactly at the cutoff: kept
    running = plan_and_lease(store, {"n": 12}).job_id
    waiting = store.plan("linear", {"n": 11})
    report = store.prune(finished_before=clock())
    assert report == PruneReport(jobs=3, effects=3, tombstones=3, forgotten=0, batches=1)
    assert ids_of(store) == [boundary, running, waiting]
    assert store.stats().by_state["linear"] == {"NEW": 2, "A": 0, "B": 0, "DONE": 1, "FAILED": 0}
    for job_id in old:
        assert job_id not in {j.job_id for j in store.jobs(state="DONE")}


def test_a_pruned_job_reads_as_pruned_with_when_it_finished(
    store: Store, clock: ManualClock
) -> None:
    setup(store)
    job_id = finish(store, 1)
    finished_at = clock()
    clock.advance(5)
    store.prune(finished_before=clock())
    for read in (store.job, store.state, store.effects, store.history):
        with pytest.raises(JobPruned) as caught:
            read(job_id)
        assert isinstance(caught.value, UnknownJob)
        assert (caught.value.state, caught.value.finished_at) == ("DONE", finished_at)
        assert caught.value.pruned_at == clock()
        assert "pruned" in str(caught.value)
        assert "--forget-keys" in str(caught.value)
    with pytest.raises(JobPruned):
        store.cancel(job_id, "too late")
    with pytest.raises(JobPruned):
        store.retry(job_id)
    with pytest.raises(UnknownJob) as never:
        store.job("0" * 64)
    assert not isinstance(never.value, JobPruned)


def test_a_lease_of_a_pruned_job_is_lost(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store, {"n": 1})
    for state in ("A", "B", "DONE"):
        store.advance(lease, state)
    clock.advance(1)
    store.prune(finished_before=clock())
    calls = (
        lambda: store.advance(lease, "A"),
        lambda: store.renew(lease),
        lambda: store.release(lease),
        lambda: store.fail(lease, "late"),
        lambda: store.run_effect(lease, "late", lambda ctx: 1),
    )
    for call in calls:
        with pytest.raises(LeaseLost, match="pruned") as caught:
            call()
        assert caught.value.current_token is None


def test_planning_a_pruned_identity_again_is_a_no_op(store: Store, clock: ManualClock) -> None:
    setup(store)
    job_id = finish(store, 1)
    clock.advance(1)
    store.prune(finished_before=clock())
    assert store.plan("linear", {"n": 1}) == job_id
    # The payload is not kept in the tombstone, so it cannot conflict.
    assert store.plan("linear", {"n": 1}, payload={"other": True}) == job_id
    assert store.plan_many("linear", [{"n": 1}, {"n": 2}, {"n": 1}])[0::2] == [job_id, job_id]
    assert store.lease_next("w1") is not None  # n=2 only
    assert store.lease_next("w1") is None
    with pytest.raises(JobPruned):
        store.job(job_id)
    assert len(store.jobs()) == 1


def test_a_conflicting_payload_of_a_live_job_still_conflicts_after_a_prune(
    store: Store, clock: ManualClock
) -> None:
    setup(store)
    finish(store, 1)
    store.plan("linear", {"n": 2}, payload={"p": 1})
    clock.advance(1)
    store.prune(finished_before=clock())
    with pytest.raises(IdempotencyConflict):
        store.plan("linear", {"n": 2}, payload={"p": 2})


def test_keep_failed_keeps_the_failed_jobs(store: Store, clock: ManualClock) -> None:
    setup(store)
    done = finish(store, 1)
    failed = finish(store, 2, failed=True)
    clock.advance(1)
    assert store.prune(finished_before=clock(), keep_failed=True).jobs == 1
    assert ids_of(store) == [failed]
    with pytest.raises(JobPruned):
        store.job(done)
    assert store.prune(finished_before=clock()).jobs == 1
    assert ids_of(store) == []


def test_dry_run_counts_and_changes_nothing(store: Store, clock: ManualClock) -> None:
    setup(store)
    ids = [finish(store, n) for n in range(3)]
    clock.advance(1)
    before = [snapshot(store, j) for j in ids]
    report = store.prune(finished_before=clock(), dry_run=True)
    assert report == PruneReport(jobs=3, effects=3, tombstones=3, forgotten=0, batches=0)
    assert [snapshot(store, j) for j in ids] == before
    assert store.prune(finished_before=clock(), dry_run=True, limit=2).jobs == 2
    assert store.prune(finished_before=clock(), dry_run=True, forget_keys=True).tombstones == 0


def test_forget_keys_lets_the_identity_be_planned_anew(store: Store, clock: ManualClock) -> None:
    setup(store)
    job_id = finish(store, 1)
    clock.advance(1)
    report = store.prune(finished_before=clock(), forget_keys=True)
    assert report == PruneReport(jobs=1, effects=1, tombstones=0, forgotten=0, batches=1)
    with pytest.raises(UnknownJob) as caught:
        store.job(job_id)
    assert not isinstance(caught.value, JobPruned)
    assert store.plan("linear", {"n": 1}) == job_id
    assert store.job(job_id).state == "NEW"
    # A new job: nothing of the pruned one (its effects, its history) comes back.
    assert store.effects(job_id) == []
    assert [(e.event, e.at) for e in store.history(job_id)] == [("planned", clock())]


def test_forget_keys_also_forgets_earlier_tombstones_before_the_cutoff(
    store: Store, clock: ManualClock
) -> None:
    setup(store)
    first = finish(store, 1)
    failed = finish(store, 2, failed=True)
    clock.advance(1)
    store.prune(finished_before=clock())
    clock.advance(10)
    late = finish(store, 3)
    clock.advance(1)
    store.prune(finished_before=clock())
    # Forget the keys of jobs that finished before the first cutoff, failed ones kept.
    cutoff = clock() - 5
    assert store.prune(
        finished_before=cutoff, forget_keys=True, keep_failed=True, dry_run=True
    ) == PruneReport(forgotten=1)
    report = store.prune(finished_before=cutoff, forget_keys=True, keep_failed=True)
    assert report == PruneReport(jobs=0, effects=0, tombstones=0, forgotten=1, batches=1)
    assert store.plan("linear", {"n": 1}) == first
    assert store.job(first).state == "NEW"
    for kept in (failed, late):
        with pytest.raises(JobPruned):
            store.job(kept)
    assert store.prune(finished_before=clock(), forget_keys=True).forgotten == 2


def test_batches_and_progress(store: Store, clock: ManualClock) -> None:
    setup(store)
    ids = [finish(store, n) for n in range(5)]
    clock.advance(1)
    seen: list[PruneReport] = []
    report = store.prune(finished_before=clock(), batch_size=2, progress=seen.append)
    assert report == PruneReport(jobs=5, effects=5, tombstones=5, forgotten=0, batches=3)
    assert [(r.jobs, r.batches) for r in seen] == [(2, 1), (4, 2), (5, 3)]
    assert seen[-1] == report
    for job_id in ids:
        with pytest.raises(JobPruned):
            store.job(job_id)


def test_limit_caps_the_jobs_removed_in_planned_order(store: Store, clock: ManualClock) -> None:
    setup(store)
    ids = [finish(store, n) for n in range(5)]
    clock.advance(1)
    assert store.prune(finished_before=clock(), batch_size=2, limit=3).batches == 2
    assert ids_of(store) == ids[3:]
    assert store.prune(finished_before=clock(), limit=0) == PruneReport()
    assert ids_of(store) == ids[3:]


def test_limit_skips_forgetting_old_keys(store: Store, clock: ManualClock) -> None:
    setup(store)
    finish(store, 1)
    clock.advance(1)
    store.prune(finished_before=clock())
    finish(store, 2)
    clock.advance(1)
    report = store.prune(finished_before=clock(), forget_keys=True, limit=5)
    assert (report.jobs, report.forgotten) == (1, 0)


def test_the_archive_sees_each_batch_as_show_would_before_it_is_deleted(
    store: Store, clock: ManualClock
) -> None:
    setup(store)
    ids = [finish(store, n) for n in range(3)]
    clock.advance(1)
    shown = {j: snapshot(store, j) for j in ids}
    batches: list[list[PrunedJob]] = []

    def archive(jobs: Sequence[PrunedJob]) -> None:
        for pruned in jobs:
            assert store.job(pruned.job.job_id) == pruned.job  # not deleted yet
            # Reads of several statements too (on SQLite, inside the prune's transaction).
            assert store.effects(pruned.job.job_id) == list(pruned.effects)
            assert store.history(pruned.job.job_id) == list(pruned.history)
        batches.append(list(jobs))

    store.prune(finished_before=clock(), batch_size=2, archive=archive)
    assert [[p.job.job_id for p in b] for b in batches] == [ids[:2], ids[2:]]
    for pruned in batches[0] + batches[1]:
        job, effects, history = shown[pruned.job.job_id]
        assert (pruned.job, list(pruned.effects), list(pruned.history)) == (job, effects, history)


def test_an_archive_that_fails_stops_the_prune_and_keeps_that_batch(
    store: Store, clock: ManualClock
) -> None:
    setup(store)
    ids = [finish(store, n) for n in range(4)]
    clock.advance(1)
    calls: list[int] = []

    def archive(jobs: Sequence[PrunedJob]) -> None:
        calls.append(len(jobs))
        if len(calls) == 2:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.prune(finished_before=clock(), batch_size=2, archive=archive)
    assert ids_of(store) == ids[2:]
    assert store.prune(finished_before=clock()).jobs == 2


def test_a_retried_job_is_pruned_by_when_it_finished_last(store: Store, clock: ManualClock) -> None:
    setup(store)
    job_id = finish(store, 1, failed=True)
    clock.advance(5)
    store.retry(job_id)
    assert store.prune(finished_before=clock() + 1).jobs == 0
    lease = store.lease_next("w1")
    assert lease is not None
    store.cancel(job_id, "give up")
    assert store.prune(finished_before=clock()).jobs == 0  # finished at the cutoff
    clock.advance(1)
    assert store.prune(finished_before=clock()).jobs == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"finished_before": float("nan")},
        {"finished_before": "yesterday"},
        {"finished_before": 1.0, "batch_size": 0},
        {"finished_before": 1.0, "batch_size": True},
        {"finished_before": 1.0, "limit": -1},
    ],
)
def test_bad_prune_arguments_are_refused(store: Store, kwargs: dict[str, object]) -> None:
    setup(store, LINEAR)
    with pytest.raises(InvalidInput):
        store.prune(**kwargs)  # type: ignore[arg-type]
